"""How many lanes an engine over a plan's stages should keep: its round, in steady state.

On several nodes each node runs its own engine over its own copies (`Plan.engine_plans`); everything
below is per engine, and the plan's capacity is the rate at which the first engine saturates (`settle`).

The engine (`planc.runtime.engine`) splits the running sequences into lanes; each lane walks the
engine's stages in turn, one call per copy at each, and the engine moves the oldest lane on as soon
as its calls are done. More lanes overlap stages on different devices, but every copy then runs
one call per lane, and a decode call streams its weights whatever its size; where stages share
devices there is nothing to overlap. Which count wins depends on the plan: it is chosen here, at
plan time, from the layouts' step costs, and recorded in the plan (`Plan.settings["lanes"]`).

The model is the engine's lane loop without requests, its calls run on a `planc.sim_devices.DeviceClock`
(copies that share a device are time-sliced; a copy runs its calls in order). Each copy's call costs a
fixed part (`fixed_ms`, a one-sequence decode step: its weights) plus a part that grows with what it
carries (`tau_ms`: the prompt, and what one more sequence adds to a decode step), split evenly between
the lanes. The copies hold the sequences the engine admits, each group's share of them; the round
follows, and with it the rate at which sequences finish (at most the SLO's TPOT per round): the
engine capacity (`engine_capacity`). Unlike the MIP's figure, which lets every copy step at its own
pace, a stage's copies step together here: a copy with a small batch waits for the largest. The lane
count with the highest capacity is the plan's (`best_lanes`).

Checked against the simulation of the plans (`planc.plan_sim`, benchmarks/RESULTS.md "Plan vs
baselines", session 8): the capacity was 0.77-1.01 of the simulated one, and it ranked lane counts as
the simulation did.
"""
from __future__ import annotations

import math
from collections import deque
from typing import Any

from planc.sim_devices import DeviceClock

_ROUNDS = 6
"""Rounds run per evaluation; the last half is measured."""


def call_costs(plan: Any, chain_length: int, sequences: float) -> list[list[tuple[tuple, dict, float, float]]]:
    """Per engine stage, per copy serving it: (copy key, {device: 1}, seconds of its call that do not
    grow with what it carries, seconds its call adds with one lane when `sequences` are in flight in the
    whole engine). A copy holds its group's share of them, split over the group's copies by what each
    holds; each adds its per-request time over its output tokens. A copy's pipeline stage counts pro
    rata to the blocks of it the engine stage holds."""
    out = []
    for r, groups in plan.stage_groups(chain_length):
        calls = []
        for g in groups:
            copies = plan.copies(g["id"])
            held = [len(c) * c[0].batch for c in copies]
            for n, copy in enumerate(copies):
                lay = next((x for x in g["layouts"] if x["pp"] == len(copy) and x["tp"] == copy[0].tp
                            and x["batch"] == copy[0].batch), None)
                if lay is None or not lay.get("fixed_ms"):
                    continue
                fixed = grow = 0.0
                devices: dict = {}
                start = g["first_position"]
                for i, p in enumerate(copy):
                    stop = start + len(p.blocks)
                    frac = max(0, min(stop, r.stop) - max(start, r.start)) / max(1, len(p.blocks))
                    start = stop
                    if frac:
                        fixed += frac * lay["fixed_ms"][i] / 1e3
                        mine = sequences * g["share"] * held[n] / sum(held)
                        grow += frac * mine * lay["tau_ms"][i] / 1e3 / plan.settings["output_tokens"]
                        devices.update({(p.node, d): 1.0 for d in p.devices})
                calls.append(((g["id"], n, r.start), devices, fixed, grow))
        out.append(calls)
    return out


def _measured_round(costs, lanes: int, occupancy: float) -> float:
    """Run the lanes for `_ROUNDS` rounds, each call its fixed part plus `occupancy` of its growing part,
    split between the lanes; the mean round over the second half."""
    demands = {key: devices for calls in costs for key, devices, _, _ in calls}
    clock = DeviceClock(demands)
    queues: dict[tuple, deque] = {key: deque() for key in demands}
    running: dict[tuple, int] = {}
    pending = [0] * lanes
    stage = [0] * lanes
    done: list[float] = []
    now = 0.0

    def submit(lane: int) -> None:
        calls = costs[stage[lane]]
        pending[lane] = len(calls)
        for key, _, fixed, grow in calls:
            queues[key].append((lane, fixed + grow * occupancy / lanes))
            if key not in running:
                start(key)

    def start(key: tuple) -> None:
        lane, seconds = queues[key].popleft()
        running[key] = lane
        clock.start(key, now, now + seconds)

    order = deque(range(lanes))
    for lane in order:
        submit(lane)
    target = _ROUNDS * lanes
    while len(done) < target:
        lane = order[0]
        while pending[lane]:
            now = clock.next_end()
            if not math.isfinite(now):
                return math.inf
            for key in clock.pop_ended(now):
                pending[running.pop(key)] -= 1
                if queues[key]:
                    start(key)
        order.popleft()
        stage[lane] += 1
        if stage[lane] == len(costs):
            stage[lane] = 0
            done.append(now)
        submit(lane)
        order.append(lane)
    half = done[len(done) // 2 - 1:]
    return (half[-1] - half[0]) / (len(half) - 1) * lanes


MAX_LANES = 4
"""Lane counts tried (at most one per engine stage)."""

LANE_MARGIN = 0.05
"""A count with more lanes is kept only when its engine capacity beats the fewer lanes' by this much:
more lanes mean more calls, each streaming its copy's weights, for a gain the model cannot resolve."""


def best_lanes(plan: Any, chain_length: int) -> int:
    """The lane count (1 to the number of engine stages, at most `MAX_LANES`) with the highest
    `engine_capacity`, more lanes only where they beat fewer by `LANE_MARGIN`; 1 when no count meets
    the SLO."""
    return _best(lane_capacities(plan, chain_length))


def lane_capacities(plan: Any, chain_length: int) -> dict[int, float]:
    """`engine_capacity` for each lane count tried (the calls' costs worked out once)."""
    stages = len(plan.stage_ranges(chain_length))
    inputs = _engine_inputs(plan, chain_length)
    return {n: _capacity(plan, *inputs, n) for n in range(1, min(stages, MAX_LANES) + 1)}


def _best(capacities: dict[int, float]) -> int:
    best = 1
    for n, rps in sorted(capacities.items()):
        if rps > capacities[best] * (1 + LANE_MARGIN):
            best = n
    return best


def engine_capacity(plan: Any, chain_length: int, lanes: int) -> float:
    """Requests/s the plan's one engine sustains within the SLO's TPOT, from its rounds rather than from
    each copy's own pace (the MIP's figure): the engine moves a lane on when the slowest of its calls
    is done, so a stage's copies step together. In flight: as many sequences as the engine admits
    (`Plan.engine_limits`) and every group's copies hold for its share of them; at a fraction f of that,
    each call costs its fixed part plus its copy's sequences' part; the round R(f) is the lanes' loop
    on the devices (`_measured_round`), and the rate f x sequences / (output tokens x R(f) + TTFT),
    at the largest f whose round meets the TPOT SLO (0 when even one sequence's does not)."""
    return _capacity(plan, *_engine_inputs(plan, chain_length), lanes)


def _engine_inputs(plan: Any, chain_length: int) -> tuple[float, list, float]:
    """The sequences in flight at full occupancy, the calls' costs with them, and the plan's TTFT."""
    room = [sum(len(c) * c[0].batch for c in plan.copies(g["id"])) / g["share"] for g in plan.groups if g["share"] > 0]
    sequences = min(room + [plan.engine_limits(chain_length, 1)[0]])
    ttft = max((v["ttft_ms"] for v in plan.predicted.get("variants", {}).values()), default=0.0) / 1e3
    return sequences, call_costs(plan, chain_length, sequences), ttft


def _capacity(plan: Any, sequences: float, costs: list, ttft: float, lanes: int) -> float:
    output, tpot = plan.settings["output_tokens"], plan.settings["slo"]["tpot_ms"] / 1e3
    if not costs or not all(costs) or sequences <= 0:
        return 0.0

    def round_at(f: float) -> float:
        return _measured_round(costs, lanes, f)

    # the round is close to affine in f (fixed work plus work per sequence): regula falsi on R(f) = TPOT
    f, r = 1.0, round_at(1.0)
    if r > tpot:
        lo, r_lo, hi, r_hi = 0.0, round_at(0.0), 1.0, r
        if r_lo > tpot:
            return 0.0
        for _ in range(8):
            f = lo + (tpot - r_lo) * (hi - lo) / (r_hi - r_lo)
            r = round_at(f)
            if abs(r - tpot) <= 1e-3 * tpot:
                break
            lo, r_lo, hi, r_hi = (f, r, hi, r_hi) if r < tpot else (lo, r_lo, f, r)
        if r > tpot * (1 + 1e-3):
            f, r = lo, r_lo
    if f <= 0:
        return 0.0
    return f * sequences / (output * r + ttft)


def settle(plan: Any, settings: dict) -> None:
    """Give `plan` the planner's `settings` plus the lanes its engine should keep (`best_lanes`),
    which `planc serve` and the plan simulation read (`planc.runtime.engine.plan_lanes`), and the
    engine capacity at that count (`predicted["engine_capacity_rps"]`).

    On several nodes every node's engine gets its own count (`settings["lanes_per_node"]`) and capacity
    (`predicted["engines"]`: per node its lanes, capacity and share of the traffic); the plan's capacity
    is the rate at which the first of them saturates, the router sending each node its share."""
    plan.settings = dict(settings)
    chain_length = max((g["first_position"] + g["num_blocks"] for g in plan.groups), default=0)
    engines = plan.engine_plans()
    if len(engines) == 1:
        capacities = lane_capacities(plan, chain_length)
        plan.settings["lanes"] = _best(capacities)
        plan.predicted["engine_capacity_rps"] = capacities[plan.settings["lanes"]]
        return
    per_node = {}
    for node, part in engines:
        capacities = lane_capacities(part, chain_length)
        lanes = _best(capacities)
        per_node[str(node)] = {"lanes": lanes, "engine_capacity_rps": capacities[lanes],
                               "share": sum(plan.node_traffic(node).values())}
    plan.settings["lanes_per_node"] = {k: e["lanes"] for k, e in per_node.items()}
    plan.predicted["engines"] = per_node
    plan.predicted["engine_capacity_rps"] = min((e["engine_capacity_rps"] / e["share"] for e in per_node.values()
                                                 if e["share"] > 0), default=0.0)
