"""How many lanes the one engine over a plan's stages should keep: its round, in steady state.

The engine (`planc.runtime.engine`) splits the running sequences into lanes; each lane walks the
engine's stages in turn, one call per copy at each, and the engine moves the oldest lane on as soon
as its calls are done. More lanes overlap stages on different devices, but every copy then runs
one call per lane, and a decode call streams its weights whatever its size; where stages share
devices there is nothing to overlap. Which count wins depends on the plan: it is chosen here, at
plan time, from the layouts' step costs, and recorded in the plan (`Plan.settings["lanes"]`).

The model is the engine's lane loop without requests: the work of a round (every running sequence
one token on) is fixed per copy (`fixed_ms`, a one-sequence decode step) plus, per request/s routed
through the copy, its per-request device time (`tau_ms`: the prompt, and what one more sequence adds
to a decode step) for every second of the round, split evenly between the lanes. Given a round of T
seconds, the lanes' calls run on a `planc.sim_devices.DeviceClock` (copies that share a device are
time-sliced; a copy runs its calls in order) until the rounds repeat; the measured round is the next
T. The fixed point is the plan's TPOT with that many lanes (inf when the load does not fit).
"""
from __future__ import annotations

import math
from collections import deque
from typing import Any

from planc.sim_devices import DeviceClock

_ROUNDS = 6
"""Rounds run per evaluation; the last half is measured."""


def call_costs(plan: Any, chain_length: int) -> list[list[tuple[tuple, dict, float, float]]]:
    """Per engine stage, per copy serving it: (copy key, {device: 1}, seconds of its call that do not
    grow with the load, seconds per second of round at the plan's load), with one lane. A copy's
    pipeline stage counts pro rata to the blocks of it the engine stage holds."""
    out = []
    for r, groups in plan.stage_groups(chain_length):
        calls = []
        for g in groups:
            for n, copy in enumerate(plan.copies(g["id"])):
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
                        grow += frac * p.load_rps * lay["tau_ms"][i] / 1e3
                        devices.update({(p.node, d): 1.0 for d in p.devices})
                calls.append(((g["id"], n, r.start), devices, fixed, grow))
        out.append(calls)
    return out


def round_time(costs: list[list[tuple[tuple, dict, float, float]]], lanes: int, load: float = 1.0) -> float:
    """The engine's round (seconds) with `lanes` lanes at `load` times the plan's routed load: the
    fixed point of round -> measured round, by secant steps (the map is close to affine: fixed
    work plus load work proportional to the round); inf when it has none (the load does not fit)."""
    floor = sum(max((c[2] for c in calls), default=0.0) for calls in costs)
    t0, g0 = floor, _measured_round(costs, lanes, load, floor)
    t1 = g0
    for _ in range(12):
        g1 = _measured_round(costs, lanes, load, t1)
        if not math.isfinite(g1) or g1 > 1e3 * max(floor, 1e-9):
            return math.inf
        if abs(g1 - t1) <= 1e-3 * g1:
            return g1
        slope = (g1 - g0) / (t1 - t0) if t1 != t0 else 0.0
        if slope >= 1.0:
            return math.inf  # each second of round brings more than a second of work
        t0, g0, t1 = t1, g1, max(floor, (g1 - slope * t1) / (1.0 - slope))
    return math.inf


def _measured_round(costs, lanes: int, load: float, t: float) -> float:
    """Run the lanes for `_ROUNDS` rounds with calls sized for a round of `t` seconds; the mean round
    over the second half."""
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
            queues[key].append((lane, fixed + grow * load * t / lanes))
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

LOADS = (0.7, 0.5, 0.3)
"""Shares of the plan's routed load the rounds are compared at: the first at which some count fits."""


def best_lanes(plan: Any, chain_length: int) -> int:
    """The lane count (1 to the number of engine stages, at most `MAX_LANES`) with the shortest round
    at 70% of the plan's routed load (near capacity, where lanes matter; at capacity every count's
    round is unbounded), or at the first of `LOADS` where some count's round is finite; ties go
    to fewer lanes."""
    costs = call_costs(plan, chain_length)
    if not costs or not all(costs):
        return 1
    counts = range(1, min(len(costs), MAX_LANES) + 1)
    for load in LOADS:
        rounds = {n: round_time(costs, n, load) for n in counts}
        if any(math.isfinite(t) for t in rounds.values()):
            return min(counts, key=lambda n: (rounds[n], n))
    return 1


def settle(plan: Any, settings: dict) -> None:
    """Give `plan` the planner's `settings` plus the lanes its engine should keep (`best_lanes`),
    which `planc serve` and the plan simulation read (`planc.runtime.engine.plan_lanes`)."""
    plan.settings = dict(settings)
    chain_length = max((g["first_position"] + g["num_blocks"] for g in plan.groups), default=0)
    plan.settings["lanes"] = best_lanes(plan, chain_length)
