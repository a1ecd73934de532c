"""One engine whose steps walk stages served by actors: planc's runtime on Ray, simulated.

`planc.runtime.engine.Engine` with `RemoteStage`s (backends/ray_stage.py) schedules every sequence
of the deployment. The chain is cut into stages (ranges of positions); at each stage, every variant
has one actor (its block group's) with one or more copies, and a sequence sticks to one copy per
stage, chosen when its KV is first reserved: the copy with the most free KV pages (the first on a
tie, as `max` picks). The engine pipelines: with L lanes (`EngineConfig.lanes`, at most one per
stage; None: one per stage) it keeps up to L lanes in flight, each with ceil(running / L) of the
running sequences that are not in flight; every iteration it starts lanes until L are in flight,
then waits for the oldest lane's current stage and hands the lane on to the next stage (or samples
after the last). A lane's stage is one call per copy its sequences
stick to, all sent at once; a copy (one actor process) runs its calls one at a time in the order
they were sent. A call lasts `planc.sim_step.StepModel.step_time` of its sequences over the stage's
positions on that copy's blocks (its TP), and occupies all of the copy's devices while it runs;
calls of different copies on one device are time-sliced (`planc.sim_devices.DeviceClock`).

Scheduling is the engine's, shared with `planc.simulate` (`planc.sim_sched`: admission under max_running and the token
budget, KV reserved in every stage or none, preemption of the newest sequence not in flight, decodes
first then prompt chunks). The engine thread's own time and the transport of hidden states between
stages are not modelled (zero); the HTTP server's parse and stream delays are (profile
server_request_us / server_token_us), its cost to the engine thread is not.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

from planc.cost import CostModel
from planc.runtime.engine import EngineConfig
from planc.sim_devices import DeviceClock
from planc.sim_model import SimModel
from planc.sim_report import RequestRecord, SimResult
from planc.sim_sched import Scheduler, SimSeq
from planc.sim_step import StepModel
from planc.workload import Request


@dataclass
class CopySpec:
    """One copy of a group's actor over one stage."""

    model: SimModel
    """The group's users' chains over the stage's positions, block costs at the copy's TP."""
    devices: Mapping[int, float]
    """Share of each device a call asks for while it runs (1 on each of its TP devices)."""
    kv_tokens: int
    """Tokens of KV each layer of the copy holds (ignored when the stage has no KV layers)."""
    block_batch_cap: int = 256


@dataclass
class StagedRun:
    """A deployment: per stage (in chain order), per variant, the copies that may serve it there."""

    stages: Sequence[Mapping[str, Sequence[CopySpec]]]
    requests: Sequence[Request]
    config: EngineConfig = field(default_factory=EngineConfig)
    """Engine-wide settings: max_running, max_batch_tokens, page_size, max_queue, max_model_len, lanes."""


@dataclass(eq=False, slots=True)
class _View:
    """A sequence as one copy's StepModel reads it (variant index in the copy's model)."""

    variant: int
    computed: int
    scheduled: int


class _Copy:
    """A copy's runtime state: its free KV pages and its queue of calls."""

    def __init__(self, key: tuple, spec: CopySpec, step: StepModel, page_size: int):
        self.key, self.spec, self.step = key, spec, step
        self.local = {name: i for i, name in enumerate(spec.model.variants)}
        self.num_pages = spec.kv_tokens // page_size if spec.model.num_kv_layers else None
        self.free = self.num_pages if self.num_pages is not None else 0
        self.queue: deque = deque()
        self.running: Optional["_Lane"] = None
        self.busy_s, self.num_calls = 0.0, 0


@dataclass(eq=False)
class _Lane:
    work: list
    stage: int = 0
    pending: int = 0
    """Calls of its current stage not yet done."""


class _StagedEngine(Scheduler):
    """The engine's scheduling (`planc.sim_sched`) with KV in every stage's copy, and its lanes on the clock."""

    def __init__(self, run: StagedRun, cost_model: CostModel, server: bool):
        ov = cost_model.device.overheads
        super().__init__(run.config, ov.server_token_us * 1e-6 if server else 0.0)
        self.requests = run.requests
        request_s = ov.server_request_us * 1e-6 if server else 0.0
        steps: dict[tuple, StepModel] = {}
        made: dict[int, _Copy] = {}
        for stage, spec in copy_specs(run):
            key = (id(spec.model), spec.block_batch_cap)
            if key not in steps:
                steps[key] = StepModel(spec.model, cost_model, EngineConfig(block_batch_cap=spec.block_batch_cap))
            made[id(spec)] = _Copy((stage, len(made)), spec, steps[key], self.cfg.page_size)
        self.stages: list[dict[str, list[_Copy]]] = [
            {variant: [made[id(spec)] for spec in specs] for variant, specs in actors.items()} for actors in run.stages]
        self.copies = list(made.values())
        self.by_key = {c.key: c for c in self.copies}
        self.clock = DeviceClock({c.key: c.spec.devices for c in self.copies})
        with_kv = [c.num_pages * self.cfg.page_size for c in self.copies if c.num_pages is not None]
        self.capacity = min(with_kv, default=1 << 62)
        self.records = [RequestRecord(i, r.variant, r.arrival_s, r.prompt_tokens, r.output_tokens)
                        for i, r in enumerate(self.requests)]
        self.order = sorted(range(len(self.requests)), key=lambda i: (self.requests[i].arrival_s, i))
        self.due = [self.requests[i].arrival_s + request_s for i in self.order]
        self.nxt = 0
        self.lanes: deque[_Lane] = deque()
        self.num_lanes = min(self.cfg.lanes or len(self.stages), len(self.stages))  # as the engine

    # ------------------------------------------------------------------ the clock
    def run(self) -> SimResult:
        now, blocked = 0.0, None
        while True:
            if blocked is None:
                blocked = self._iterate(now)
            if blocked is None:  # idle until the next request is parsed
                if self.nxt >= len(self.order):
                    break
                now = self.due[self.nxt]
                continue
            now = self.clock.next_end()
            assert now < math.inf, "the engine waits on a lane with no call in flight"
            for key in self.clock.pop_ended(now):
                self._call_ended(self.by_key[key], now)
            if blocked.pending == 0:
                lane, blocked = blocked, None
                self._advance(lane, now)
        makespan = max((r.finish_s for r in self.records if r.finish_s is not None), default=0.0)
        return SimResult(self.records, [(c.busy_s, c.num_calls, 0) for c in self.copies], makespan,
                         capacity_tokens=self.capacity, num_pages=sum(c.num_pages or 0 for c in self.copies))

    def _iterate(self, now: float) -> Optional[_Lane]:
        """Engine iterations at `now` until it waits on a lane (returned) or has nothing to do (None)."""
        while True:
            self._drain(now)
            self.admit()
            if not self.running and not self.lanes:
                return None
            share = -(-len(self.running) // self.num_lanes)
            while len(self.lanes) < self.num_lanes:
                work = self.reserve([s for s in self.running if not s.in_flight][:share], now)
                if not work:
                    break
                for s in work:
                    s.in_flight = True
                lane = _Lane(work)
                self._submit(lane, now)
                self.lanes.append(lane)
            if not self.lanes:
                return None
            lane = self.lanes.popleft()
            if lane.pending:
                return lane
            self._advance(lane, now)

    def _submit(self, lane: _Lane, now: float) -> None:
        """The lane's calls at its stage: one per copy its sequences stick to, queued on that copy."""
        parts: dict[_Copy, list[_View]] = {}
        for s in lane.work:
            copy = s.copies[lane.stage]
            parts.setdefault(copy, []).append(_View(copy.local[s.variant], s.computed, s.scheduled))
        lane.pending = len(parts)
        for copy, views in parts.items():
            copy.queue.append((lane, copy.step.step_time(views)))
            if copy.running is None:
                self._start(copy, now)

    def _start(self, copy: _Copy, now: float) -> None:
        lane, duration = copy.queue.popleft()
        copy.running = lane
        copy.busy_s += duration
        copy.num_calls += 1
        self.clock.start(copy.key, now, now + duration)

    def _call_ended(self, copy: _Copy, now: float) -> None:
        copy.running.pending -= 1
        copy.running = None
        if copy.queue:
            self._start(copy, now)

    def _advance(self, lane: _Lane, now: float) -> None:
        if lane.stage + 1 < len(self.stages):
            lane.stage += 1
            self._submit(lane, now)
            self.lanes.append(lane)
            return
        for s in lane.work:
            s.in_flight = False
        self.sample(lane.work, now)

    # ------------------------------------------------------------------ requests and KV
    def _drain(self, now: float) -> None:
        while self.nxt < len(self.order) and self.due[self.nxt] <= now:
            j = self.order[self.nxt]
            self.nxt += 1
            req, rec = self.requests[j], self.records[j]
            if any(req.variant not in stage or not stage[req.variant] for stage in self.stages):
                rec.status, rec.finish_s = "error", now  # no copy serves its chain somewhere
            elif req.prompt_tokens + req.output_tokens > min(self.cfg.max_model_len, self.capacity):
                rec.status, rec.finish_s = "rejected", now
            elif len(self.waiting) >= self.cfg.max_queue:
                rec.status, rec.finish_s = "refused", now
            else:
                self.waiting.append(SimSeq(rec, req.variant, req.prompt_tokens, req.output_tokens))

    def _reserve_kv(self, seq: SimSeq) -> bool:
        """Grow `seq` to hold all its tokens in every stage's copy, or change nothing."""
        need = -(-seq.total // self.cfg.page_size)
        extra = need - seq.pages
        if extra <= 0 and seq.copies is not None:
            return True
        copies = seq.copies or [max(stage[seq.variant], key=lambda c: c.free) for stage in self.stages]
        if any(c.num_pages is not None and c.free < extra for c in copies):
            return False
        for c in copies:
            if c.num_pages is not None:
                c.free -= extra
        seq.pages, seq.copies = need, copies
        return True

    def _free_kv(self, seq: SimSeq) -> None:
        for c in seq.copies or ():
            if c.num_pages is not None:
                c.free += seq.pages
        seq.pages, seq.copies = 0, None


def copy_specs(run: StagedRun) -> list[tuple[int, CopySpec]]:
    """(stage, spec) of each of the run's copies once, in the order they are first met stage by stage: the
    order of `simulate_staged`'s `replicas`."""
    seen: dict[int, tuple[int, CopySpec]] = {}
    for stage, actors in enumerate(run.stages):
        for specs in actors.values():
            for spec in specs:
                seen.setdefault(id(spec), (stage, spec))
    return list(seen.values())


def simulate_staged(run: StagedRun, cost_model: CostModel, server: bool = True) -> SimResult:
    """Serve `run.requests` on one engine over `run.stages`. The result's `replicas` are the copies
    (busy seconds, calls, 0), in the order they were first met stage by stage.

    >>> from planc.cluster import load_device
    >>> from planc.cost import BlockCost
    >>> layer = BlockCost("layer", linear_flops_per_token=2e6, kv_bytes_per_token=512.0, weight_bytes=1e9)
    >>> top = SimModel.from_data({"a": [("L1", None)]}, {"L1": layer})
    >>> trunk = SimModel.from_data({"a": [("L0", None)]}, {"L0": layer})
    >>> cm, one, two = CostModel(load_device("H100-80GB"), 2), [Request(0.0, "a", 16, 2)], [Request(0.0, "a", 16, 2)] * 2
    >>> def run(top_device, requests):
    ...     stages = [{"a": [CopySpec(trunk, {0: 1.0}, 4096)]}, {"a": [CopySpec(top, {top_device: 1.0}, 4096)]}]
    ...     return max(r.e2e_s for r in simulate_staged(StagedRun(stages, requests), cm).requests)
    >>> run(0, one) == run(1, one)  # one lane: its stages never overlap, sharing a device costs nothing
    True
    >>> run(0, two) > run(1, two)  # two lanes: one's top and the other's trunk now share device 0
    True
    >>> def one_lane(top_device, requests):  # both sequences in one lane, one batch per stage
    ...     stages = [{"a": [CopySpec(trunk, {0: 1.0}, 4096)]}, {"a": [CopySpec(top, {top_device: 1.0}, 4096)]}]
    ...     result = simulate_staged(StagedRun(stages, requests, EngineConfig(lanes=1)), cm)
    ...     return max(r.e2e_s for r in result.requests)
    >>> one_lane(0, two) == one_lane(1, two)
    True
    """
    if not run.stages:
        raise ValueError("a staged run needs at least one stage")
    return _StagedEngine(run, cost_model, server).run()
