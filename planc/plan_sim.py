"""Simulate a plan as planc's runtime serves it on Ray: one engine over the plan's stages (one per node).

What is modelled (`planc.sim_stages` has the engine's side):
- One engine per node on a plan over several nodes (`Plan.engine_plans`), each over its node's copies
  and the part of the plan `Plan.for_node` gives it; the requests are split between them as the
  runtime's router splits them (`planc.runtime.router.NodeRouter`, the plan's routes), and since
  their devices are disjoint each engine is simulated on its own. One engine for the whole plan
  otherwise (one node, or a plan made before routes).
- An engine's stages are its plan's `stage_ranges` (cut at every group boundary and at the pipeline
  cuts of each layout of a group that has copies), as the runtime builds them; it schedules every sequence
  sent to it and pipelines as many lanes as `planc serve` gives it (`planc.runtime.engine.plan_lanes`:
  the planner's choice, `planc.lane_model`), at most one per stage.
- At each stage every group that covers it has one actor with as many copies as the plan gives the
  group (its placements' replicas, across layouts), as `backends/ray_layout.py` lays them out; a
  copy runs its calls on the devices of its placement that holds the stage's blocks, with the block
  costs at that placement's TP. A sequence sticks to one copy per stage (the one with the most free
  KV when it is admitted); a lane's stage is one call per copy in use, all at once, and the lane
  moves on when the slowest is done. A call occupies all of its copy's devices while it runs; calls
  of copies that share a device (the plan packs groups together) are time-sliced, so they slow
  each other (`planc.sim_devices`).
- A request's TTFT and TPOT are those of its one pass through the chain, stage after stage.
- Engine settings from the plan: each copy's KV holds its layout's batch of sequences per pipeline
  stage of the layout (pp lanes of it, as the planner sizes KV) at the traffic's mean context
  (x1.25); max_running and the token budget per step are the plan's `engine_limits`, as `planc
  serve` sets them (the budget per copy of a stage: what its step carries at capacity, at least
  max(2048, 2 x the mean prompt)); each block's batch cap is its group's largest layout batch; the
  lanes as above. The bundle's `serving` settings are not consulted.

Not modelled: LoRA adapters' delta calls (a LoRA variant runs its group's base blocks), the
transfer of hidden states between stages and Ray's per-call cost, the engine thread's own time and
what the HTTP server costs it, the local backend (all stages in one process, no pipelining).
`simulated_capacity` finds the highest arrival rate whose requests still meet the SLO.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

from planc.cost import CostModel
from planc.plan import Plan
from planc.program import Program
from planc.runtime.engine import EngineConfig, plan_lanes
from planc.runtime.router import NodeRouter
from planc.sim_model import SimModel
from planc.sim_report import summarize_records
from planc.sim_stages import CopySpec, StagedRun, copy_specs, simulate_staged
from planc.workload import Fixed, GammaWorkload, Request

KV_HEADROOM = 1.25
"""A copy's KV holds its batch of sequences at the mean context times this."""


def staged_run(program: Program, plan: Plan, requests: list[Request]) -> StagedRun:
    """The plan's deployment as the runtime runs it (see the module docstring), serving `requests`."""
    inputs = program.extras["plan_inputs"]
    costs, traffic = inputs["costs"], inputs["traffic"]
    names = list(costs)  # block names in chain order
    context = traffic.prompt_tokens + traffic.output_tokens
    stage_groups = plan.stage_groups(len(names))
    stages = []
    for r, groups in stage_groups:
        actors = {}
        for g in groups:
            cap = max((lay["batch"] for lay in g["layouts"]), default=1)
            keys = g["instance_keys"][r.start - g["first_position"]:r.stop - g["first_position"]]
            models: dict[int, SimModel] = {}
            copies = []
            for copy in plan.copies(g["id"]):
                hit = [p for p in copy if set(p.blocks) & set(names[r.start:r.stop])] or copy[:1]
                tp = max(p.tp for p in hit)
                if tp not in models:
                    block_costs = {key: dataclasses.replace(costs[names[pos]], tp=tp) for pos, key in zip(r, keys)}
                    chain = [(key, None) for key in keys]
                    models[tp] = SimModel.from_data({v: chain for v in g["users"]}, block_costs)
                batch = len(copy) * max(p.batch for p in hit)  # pp lanes of its batch, as the planner sized its KV
                devices = {(p.node, d): 1.0 for p in hit for d in p.devices}
                copies.append(CopySpec(models[tp], devices, int(batch * context * KV_HEADROOM), cap))
            actors.update({v: copies for v in g["users"]})
        stages.append(actors)
    running, tokens = plan.engine_limits(len(names), max(2048, int(traffic.prompt_tokens) * 2))
    config = EngineConfig(max_running=running, max_batch_tokens=tokens,
                          max_queue=1 << 30, max_model_len=int(context * 4), lanes=plan_lanes(plan, len(stage_groups)))
    return StagedRun(stages, requests, config)


def node_runs(program: Program, plan: Plan, requests: list[Request]) -> list[tuple[Optional[int], StagedRun]]:
    """The plan's engines, each with the requests the router sends it (`planc.runtime.router`): one per
    node on several nodes (their devices are disjoint, so each runs on its own clock), else one."""
    engines = plan.engine_plans()
    if len(engines) == 1:
        return [(None, staged_run(program, plan, requests))]
    router = NodeRouter(plan.routes)
    sent: dict[int, list[Request]] = {node: [] for node, _ in engines}
    unrouted = []
    for r in sorted(requests, key=lambda r: r.arrival_s):
        if router.serves(r.variant):
            sent[router.pick(r.variant)].append(r)
        else:
            unrouted.append(r)
    # a variant no node serves goes to the first engine, as `RoutedEngines` sends it, and fails there
    return [(node, staged_run(program, part, sent[node] + (unrouted if i == 0 else [])))
            for i, (node, part) in enumerate(engines)]


def simulate_plan(program: Program, plan: Plan, cost_model: CostModel, rate: float, num_requests: int = 400,
                  seed: int = 0) -> dict:
    """Serve `plan_requests` at `rate` (the plan's workload file replayed, or Gamma arrivals with its traffic
    mix and mean lengths); overall summary, with each device's utilisation: the share of the span from the
    first arrival to the last token that its copies' calls ran (calls of copies sharing a device are
    time-sliced and overlap: capped at 1), and their mean over the plan's devices."""
    requests = plan_requests(program, rate, num_requests, seed)
    records, busy = [], {}
    for _, run in node_runs(program, plan, requests):
        if run.requests:
            result = simulate_staged(run, cost_model)
            records += result.requests
            for (_, spec), (busy_s, _, _) in zip(copy_specs(run), result.replicas):
                for (_, device), share in spec.devices.items():
                    busy[device] = busy.get(device, 0.0) + busy_s * share
    slo = plan.settings["slo"]
    out = summarize_records(records, slo["ttft_ms"], slo["tpot_ms"])
    span = out["duration_s"]
    per_device = {str(d): min(1.0, busy.get(d, 0.0) / span) if span > 0 else 0.0 for d in plan.devices_used()}
    out["utilization"] = {"mean": sum(per_device.values()) / len(per_device) if per_device else 0.0,
                          "per_device": per_device}
    return out


def trial_span_s(plan: Plan) -> float:
    """How long a capacity trial's arrivals last (see `simulated_capacity`)."""
    return max(20.0, 5 * plan.settings["slo"]["ttft_ms"] / 1e3)


def trial_attainment(program: Program, plan: Plan, cost_model: CostModel, rate: float,
                     num_requests: int = 300) -> float:
    """The share of a capacity trial's requests at `rate` that meet the plan's SLO."""
    n = max(num_requests, int(rate * trial_span_s(plan)))
    return simulate_plan(program, plan, cost_model, rate, n)["slo"]["attainment"] or 0.0


def head_to_head(program: Program, plans: dict[str, Plan], cost_model: CostModel, rates: list[float],
                 num_requests: int = 300) -> dict[str, dict[float, float]]:
    """Each plan's SLO attainment at each of `rates`, on the same seeded trials: how deployments
    compare at one rate, finer than `simulated_capacity` resolves (its result is the lower end of a
    bracket a sixteenth of the plan's predicted throughput wide: two plans within that are not ranked)."""
    return {name: {rate: trial_attainment(program, p, cost_model, rate, num_requests) for rate in rates}
            for name, p in plans.items()}


def plan_requests(program: Program, rate: float, num_requests: int, seed: int = 0) -> list[Request]:
    """`num_requests` arrivals at a mean of `rate` per second: the plan's workload file replayed (its variants,
    lengths and gaps in order, its clock scaled to `rate`, repeated as often as needed), or without one, Gamma
    arrivals (cv 1) with the plan's traffic mix and mean lengths."""
    traffic = program.extras["plan_inputs"]["traffic"]
    if traffic.requests:
        return replay_at(traffic.requests, rate, num_requests)
    workload = GammaWorkload(rate=rate, cv=1.0, num_requests=num_requests, seed=seed,
                             variants={v: s for v, s in traffic.shares.items() if s > 0},
                             prompt_tokens=Fixed(value=max(1, round(traffic.prompt_tokens))),
                             output_tokens=Fixed(value=max(1, round(traffic.output_tokens))))
    return workload.requests(list(traffic.shares))


def replay_at(trace: Sequence[Request], rate: float, num_requests: int) -> list[Request]:
    """The first `num_requests` of `trace` repeated end to end (a mean gap between repeats), its clock scaled so
    that the requests arrive at a mean of `rate` per second.

    >>> trace = [Request(10.0, "a", 5, 2), Request(11.5, "b", 7, 3), Request(13.0, "a", 9, 4)]
    >>> [(r.arrival_s, r.variant, r.prompt_tokens) for r in replay_at(trace, 2.0, 5)]
    [(0.0, 'a', 5), (0.5, 'b', 7), (1.0, 'a', 9), (1.5, 'a', 5), (2.0, 'b', 7)]
    """
    t0 = trace[0].arrival_s
    span = trace[-1].arrival_s - t0
    gap = span / (len(trace) - 1) if len(trace) > 1 and span > 0 else 1.0
    period = span + gap  # one pass of the trace, and the gap to the next
    scale = (period / len(trace)) * rate  # the trace's own mean gap over the wanted one
    out = []
    for i in range(num_requests):
        r = trace[i % len(trace)]
        at = (r.arrival_s - t0 + (i // len(trace)) * period) / scale
        out.append(dataclasses.replace(r, arrival_s=at))
    return out


def simulated_capacity(program: Program, plan: Plan, cost_model: CostModel, attainment: float = 0.9,
                       num_requests: int = 300, steps: int = 5, max_doublings: int = 4,
                       max_requests: int = 3000) -> float:
    """Highest rate (requests/s) at which `attainment` of the requests meet the SLO: the bracket
    starts at twice the plan's predicted throughput and doubles while that rate still meets it
    (a pipelined group can beat the cost model's figure) and the doubled rate's trial fits in
    `max_requests`, then bisection.

    Each trial's arrivals span at least 20 s and five TTFT budgets, however many requests that takes
    at its rate: a burst that the engines absorb at once within the TTFT says nothing about the rate
    they sustain, and a backlog that grows by a few percent of the rate needs that long to break the
    TTFT. (Capping a trial at `max_requests` had let trials of high-rate plans span 5 s and pass.)"""
    def meets(rate: float) -> bool:
        return trial_attainment(program, plan, cost_model, rate, num_requests) >= attainment

    span_s = trial_span_s(plan)
    lo, hi = 0.0, max(plan.predicted["throughput_rps"], 1e-6) * 2
    for _ in range(max_doublings):
        if 2 * hi * span_s > max_requests or not meets(hi):
            break  # past the request budget a trial's span gets too short to show an overload
        lo, hi = hi, hi * 2
    for _ in range(steps):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if meets(mid) else (lo, mid)
    return lo
