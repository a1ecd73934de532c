"""Simulate a plan: every group replica runs planc's engine over its own blocks, on its devices.

Each block group with replicas in the plan becomes one simulated engine: its blocks sharded at
the layout's TP degree (the cost model sees the plan's `tp`), as many data-parallel replicas as the
plan gives it, its layout's batch cap, and KV for that many sequences. Every request runs through
each group of its variant's chain (the same arrivals); a token's time is the sum of the times
through its groups, since it passes them one after another. Within a replica of `pp` stages the
runtime keeps `pp` lanes of sequences in flight, one per stage (its engine pipelines concurrent
stages), so a replica is simulated as `pp` engines over the whole group, each with the layout's
batch: exact when the stages take equal time, optimistic by the imbalance otherwise.

All groups run on one clock. The runtime places each stage (a Ray actor) on its devices, several
stages of different groups possibly on one device, which then time-slices them: a lane's step asks
for 1/pp of each of its replica's stage devices, and where the steps in flight ask for more than a
device has they slow down together (`planc.sim_devices`). A replica alone on its devices steps as
it would with no other group in the plan.
`simulated_capacity` finds the highest arrival rate whose requests still meet the SLO.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from planc.cost import CostModel
from planc.plan import Plan
from planc.program import Program
from planc.runtime.engine import EngineConfig
from planc.sim_model import SimModel
from planc.sim_report import RequestRecord, summarize_records
from planc.simulate import EngineRun, simulate_engines
from planc.workload import Fixed, GammaWorkload, Request


@dataclass
class GroupEngine:
    group: str
    users: tuple[str, ...]
    model: SimModel
    config: EngineConfig
    replicas: int
    """Engines the group's requests are spread over: its replicas times their pipeline lanes."""
    devices: list[dict[int, float]]
    """Per engine (lane), the share of each device a step asks for: 1/pp on each of its replica's
    stage devices, per stage placed there."""


def group_engines(program: Program, plan: Plan) -> list[GroupEngine]:
    inputs = program.extras["plan_inputs"]
    costs, traffic = inputs["costs"], inputs["traffic"]
    engines = []
    context = traffic.prompt_tokens + traffic.output_tokens
    for g in plan.groups:
        if not g["layouts"]:
            continue
        tp = max(lay["tp"] for lay in g["layouts"])
        batch = max(lay["batch"] for lay in g["layouts"])
        lanes = sum(lay["replicas"] * lay["pp"] for lay in g["layouts"])
        block_costs = {key: dataclasses.replace(costs[name], tp=tp)
                       for name, key in zip(_names(g, costs), g["instance_keys"])}
        chain = [(key, None) for key in g["instance_keys"]]
        model = SimModel.from_data({v: chain for v in g["users"]}, block_costs)
        kv = int(model.kv_bytes_per_token * max(model.num_kv_layers, 1) * context * batch * 1.25) + 1
        config = EngineConfig(kv_cache_bytes=kv, max_running=batch, block_batch_cap=batch,
                              max_batch_tokens=max(2048, int(traffic.prompt_tokens) * 2), max_queue=1 << 30,
                              max_model_len=int(context * 4))
        devices = lane_devices(plan, g)
        assert len(devices) == lanes, f"{g['id']}: {len(devices)} lanes placed, the layouts have {lanes}"
        engines.append(GroupEngine(g["id"], tuple(g["users"]), model, config, lanes, devices))
    return engines


def lane_devices(plan: Plan, group: dict) -> list[dict[int, float]]:
    """The device shares of each lane of a group's replicas, from the plan's placements (a replica's
    stages are listed in order from stage 0, as `passes.parallelize.to_plan` writes them)."""
    replicas: list[list] = []
    for p in plan.placements:
        if p.group != group["id"]:
            continue
        if p.stage == 0:
            replicas.append([])
        assert replicas and p.stage == len(replicas[-1]), f"{group['id']}: stage {p.stage} placed out of order"
        replicas[-1].append(p.devices)
    lanes = []
    for stages in replicas:
        share: dict[int, float] = {}
        for devices in stages:
            for d in devices:
                share[d] = share.get(d, 0.0) + 1.0 / len(stages)
        lanes += [share] * len(stages)
    return lanes


def _names(group: dict, costs: dict) -> list[str]:
    """Block names of a group in chain order (costs are keyed by block name)."""
    names = list(costs)
    start = names.index(group["blocks"][0])
    return names[start:start + group["num_blocks"]]


def simulate_plan(program: Program, plan: Plan, cost_model: CostModel, rate: float, num_requests: int = 400,
                  seed: int = 0) -> dict:
    """Serve a Gamma workload at `rate` with the plan's traffic mix and mean lengths; overall summary."""
    requests = plan_requests(program, rate, num_requests, seed)
    through: dict[int, list[RequestRecord]] = {i: [] for i in range(len(requests))}
    runs, served = [], []
    for engine in group_engines(program, plan):
        mine = [i for i, r in enumerate(requests) if r.variant in engine.users]
        if mine:
            runs.append(EngineRun(engine.model, [requests[i] for i in mine], engine.config, engine.replicas,
                                  engine.devices))
            served.append(mine)
    for mine, result in zip(served, simulate_engines(runs, cost_model)):
        for i, rec in zip(mine, result.requests):
            through[i].append(rec)
    records = [_combine(i, requests[i], recs) for i, recs in through.items()]
    slo = plan.settings["slo"]
    return summarize_records(records, slo["ttft_ms"], slo["tpot_ms"])


def plan_requests(program: Program, rate: float, num_requests: int, seed: int = 0) -> list[Request]:
    """Gamma arrivals at `rate` (cv 1) with the plan's traffic mix and mean lengths."""
    traffic = program.extras["plan_inputs"]["traffic"]
    workload = GammaWorkload(rate=rate, cv=1.0, num_requests=num_requests, seed=seed,
                             variants={v: s for v, s in traffic.shares.items() if s > 0},
                             prompt_tokens=Fixed(value=max(1, round(traffic.prompt_tokens))),
                             output_tokens=Fixed(value=max(1, round(traffic.output_tokens))))
    return workload.requests(list(traffic.shares))


def _combine(index: int, request: Request, parts: list[RequestRecord]) -> RequestRecord:
    """One request's record from its passes through each group: times add up along the chain."""
    out = RequestRecord(index, request.variant, request.arrival_s, request.prompt_tokens, request.output_tokens)
    if not parts or any(p.status != "ok" for p in parts):
        out.status = next((p.status for p in parts if p.status != "ok"), "error")
        return out
    ttft = sum(p.first_token_s - p.arrival_s for p in parts)
    decode = sum(p.last_token_s - p.first_token_s for p in parts)
    out.first_token_s = request.arrival_s + ttft
    out.last_token_s = out.finish_s = out.first_token_s + decode
    out.num_tokens = min(p.num_tokens for p in parts)
    out.num_preemptions = sum(p.num_preemptions for p in parts)
    out.status = "ok"
    return out


def simulated_capacity(program: Program, plan: Plan, cost_model: CostModel, attainment: float = 0.9,
                       num_requests: int = 300, steps: int = 5, max_doublings: int = 4,
                       max_requests: int = 3000) -> float:
    """Highest rate (requests/s) at which `attainment` of the requests meet the SLO: the bracket
    starts at twice the plan's predicted throughput and doubles while that rate still meets it
    (a pipelined group can beat the cost model's figure) and the doubled rate's trial fits in
    `max_requests`, then bisection.

    Each trial's arrivals span at least 20 s and five TTFT budgets (up to `max_requests`): a burst
    that the engines absorb at once within the TTFT says nothing about the rate they sustain, and
    a backlog that grows by a few percent of the rate needs that long to break the TTFT."""
    span_s = max(20.0, 5 * plan.settings["slo"]["ttft_ms"] / 1e3)

    def meets(rate: float) -> bool:
        n = min(max_requests, max(num_requests, int(rate * span_s)))
        return (simulate_plan(program, plan, cost_model, rate, n)["slo"]["attainment"] or 0.0) >= attainment

    lo, hi = 0.0, max(plan.predicted["throughput_rps"], 1e-6) * 2
    for _ in range(max_doublings):
        if 2 * hi * span_s > max_requests or not meets(hi):
            break  # past the request budget a trial's span gets too short to show an overload
        lo, hi = hi, hi * 2
    for _ in range(steps):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if meets(mid) else (lo, mid)
    return lo
