"""A discrete-event simulator of planc's own serving runtime.

It replays a workload through a model of `planc.runtime.engine.Engine` step by step: the same
admission order and limits (max_running, max_queue), the same token budget per step
(max_batch_tokens: one token per decode first, then prompt chunks in admission order, a prompt
longer than what is left being prefilled over several steps and sampling only when it is done), the
same all-or-nothing KV page reservation per sequence (page_size, the KV budget, pages per layer of
the chain), the same preemption by recompute of the most recently admitted sequence (that policy is
`planc.sim_sched`'s, shared with `planc.sim_stages`), and the same per-step walk over
chain positions in which the sequences whose block there is the same block instance run as one
batched call (split at block_batch_cap), plus one delta call per LoRA adapter in the group. A step
lasts what `planc.sim_step.StepModel` says. Data-parallel replicas are independent engines; each
request goes to the least-loaded one (waiting + running) when it arrives. `simulate_engines` runs
several engines on one clock, time-slicing the devices their replicas share (`planc.sim_devices`).

Inside `planc serve` (the default; `server=False` for the engine alone) each replica's process also
runs the HTTP server's asyncio thread: it parses each request before the engine sees it and streams
each token after the step that sampled it (the profile's server_request_us and server_token_us: a
token reaches the client when the server has streamed it and those before it). The engine thread
pays for that thread far more than its CPU time (GIL handoffs at every torch op while the server is
runnable, its wake-ups): the profile's engine_step_us, engine_token_us and engine_request_us,
measured on a live planc serve as the time its engine thread could not run in each step, lengthen the
step during which the server streams those tokens (one wake-up per step that sampled, plus a part
per token) and parses those requests.

>>> from planc.cluster import load_device
>>> from planc.cost import BlockCost, CostModel
>>> from planc.workload import Request
>>> layer = BlockCost("layer", linear_flops_per_token=2e6, attn_flops_per_pair=512, kv_bytes_per_token=512.0,
...                   weight_bytes=1e6)
>>> model = SimModel.from_data({"a": [("L", None)]}, {"L": layer})
>>> result = simulate(model, CostModel(load_device("H100-80GB"), 2), [Request(0.0, "a", 16, 4)])
>>> result.requests[0].num_tokens, result.requests[0].status
(4, 'ok')
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

from planc.cost import CostModel
from planc.runtime.engine import EngineConfig
from planc.sim_devices import DeviceClock
from planc.sim_model import SimModel
from planc.sim_sched import Scheduler, SimSeq
from planc.sim_step import StepModel
from planc.sim_report import RequestRecord, SimResult
from planc.workload import Request

__all__ = ["simulate", "simulate_engines", "EngineRun", "step_time", "SimModel", "SimResult", "RequestRecord", "EngineConfig"]


class _Replica(Scheduler):
    """One replica: the engine's queues, its KV pages (a sequence holds its pages in every KV layer of the
    chain) and its steps."""

    def __init__(self, index: int, num_pages: int, config: EngineConfig, num_kv_layers: int, token_s: float):
        super().__init__(config, token_s)
        self.index, self.num_pages, self.free, self.num_kv_layers = index, num_pages, num_pages, num_kv_layers
        self.work: list[SimSeq] = []
        self.busy_s = 0.0
        self.num_steps = 0
        self.server_toll_s = 0.0
        """What the server's work since the last step started costs the engine thread (tokens streamed,
        requests parsed); the next step pays it, less what the engine spent idle meanwhile."""
        self.last_end = 0.0
        """When the last step ended (the engine is idle from then until its next step starts)."""

    @property
    def load(self) -> int:
        return len(self.waiting) + len(self.running)

    def _reserve_kv(self, seq: SimSeq) -> bool:
        """Grow `seq` to hold all its tokens in every KV layer, or change nothing."""
        need = -(-seq.total // self.cfg.page_size)
        if need <= seq.pages:
            return True
        extra = self.num_kv_layers * (need - seq.pages)
        if extra > self.free:
            return False
        self.free -= extra
        seq.pages = need
        return True

    def _free_kv(self, seq: SimSeq) -> None:
        self.free += seq.pages * self.num_kv_layers
        seq.pages = 0


class _Engine:
    """Drives one engine's replicas step by step (the scheduling decisions are `planc.sim_sched`'s) and
    charges each step its time and the HTTP server's toll."""

    def __init__(self, model: SimModel, cost_model: CostModel, config: EngineConfig, server: bool = False):
        self.model, self.cfg = model, config
        self.steps = StepModel(model, cost_model, config)
        ov = cost_model.device.overheads
        self.token_s = ov.server_token_us * 1e-6 if server else 0.0
        self.request_s = ov.server_request_us * 1e-6 if server else 0.0
        self.toll_token_s = ov.engine_token_us * 1e-6 if server else 0.0
        self.toll_step_s = ov.engine_step_us * 1e-6 if server else 0.0
        self.toll_request_s = ov.engine_request_us * 1e-6 if server else 0.0

    def replica(self, index: int, num_pages: int) -> _Replica:
        return _Replica(index, num_pages, self.cfg, self.model.num_kv_layers, self.token_s)

    # ------------------------------------------------------------------ one step
    def start_step(self, r: _Replica, now: float) -> Optional[float]:
        """Admit, reserve KV (preempting), and return when the step's forward ends (None: idle)."""
        while True:
            r.admit()
            if not r.running:
                return None
            r.work = r.reserve(r.running, now)
            if r.work:
                break
        self._idle_until(r, now)
        duration = self.steps.step_time(r.work) + r.server_toll_s
        r.server_toll_s = 0.0
        r.busy_s += duration
        r.num_steps += 1
        return now + duration

    def server_request(self, r: _Replica, now: float) -> None:
        """A request's parsing costs the engine thread its share (the next step pays it)."""
        if not r.work:
            self._idle_until(r, now)
        r.server_toll_s += self.toll_request_s

    @staticmethod
    def _idle_until(r: _Replica, now: float) -> None:
        """The server's work done while the engine had nothing to run cost it nothing."""
        r.server_toll_s = max(0.0, r.server_toll_s - (now - r.last_end))
        r.last_end = now

    def end_step(self, r: _Replica, now: float) -> None:
        """The step's sequences sample (`Scheduler.sample`); the server wakes to stream their tokens while
        the next step runs, which pays for it (once per step that sampled, and per token)."""
        sampled = r.sample(r.work, now)
        if sampled:
            r.server_toll_s += self.toll_step_s + sampled * self.toll_token_s
        r.work, r.last_end = [], now


def simulate(model: SimModel, cost_model: CostModel, requests: Sequence[Request],
             engine: Optional[EngineConfig] = None, replicas: int = 1, server: bool = True) -> SimResult:
    """Serve `requests` (in arrival order) on `replicas` copies of an engine with `engine` settings.

    `server`: each replica runs inside `planc serve`, whose asyncio thread parses requests and streams
    tokens (the profile's server_request_us and server_token_us) under the GIL the engine thread also
    needs; False simulates the engine alone, as a benchmark that calls it in-process sees it."""
    return simulate_engines([EngineRun(model, requests, engine or EngineConfig(), replicas)], cost_model, server)[0]


@dataclass
class EngineRun:
    """One engine of a co-simulation: its model and settings, its replicas and the requests it serves."""

    model: SimModel
    requests: Sequence[Request]
    config: EngineConfig = field(default_factory=EngineConfig)
    replicas: int = 1
    devices: Sequence[Mapping[int, float]] = ()
    """Per replica, the share of each device one of its steps asks for (`planc.sim_devices`); none: it
    has devices of its own."""


def simulate_engines(runs: Sequence[EngineRun], cost_model: CostModel, server: bool = True) -> list[SimResult]:
    """Serve each run's requests on its engine's replicas, all on one clock: replicas whose `devices`
    overlap share those devices' time (`planc.sim_devices.DeviceClock`); the others step as they would
    alone. One result per run.

    >>> from planc.cluster import load_device
    >>> from planc.cost import BlockCost
    >>> layer = BlockCost("layer", linear_flops_per_token=2e6, kv_bytes_per_token=512.0, weight_bytes=1e9)
    >>> model, cm = SimModel.from_data({"a": [("L", None)]}, {"L": layer}), CostModel(load_device("H100-80GB"), 2)
    >>> alone = simulate(model, cm, [Request(0.0, "a", 16, 4)]).requests[0]
    >>> both = simulate_engines([EngineRun(model, [Request(0.0, "a", 16, 4)], devices=[{0: 1.0}])] * 2, cm)
    >>> round(both[1].requests[0].e2e_s / alone.e2e_s, 3)  # one device, two engines: each at half speed
    2.0
    """
    for run in runs:
        if run.replicas < 1:
            raise ValueError("replicas must be >= 1")
        if run.devices and len(run.devices) != run.replicas:
            raise ValueError(f"devices are given for {len(run.devices)} replicas; the engine has {run.replicas}")
    fleets = [_Fleet(run, cost_model, server) for run in runs]
    clock = DeviceClock({(f, i): dev for f, run in enumerate(runs) for i, dev in enumerate(run.devices)})
    while True:
        t = min(clock.next_end(), min((f.next_due for f in fleets), default=math.inf))
        if t == math.inf:
            break
        ready = set()
        for f, i in clock.pop_ended(t):
            fleets[f].sim.end_step(fleets[f].reps[i], t)
            ready.add((f, i))
        for f, fleet in enumerate(fleets):
            ready.update((f, i) for i in fleet.arrive(t) if not clock.busy((f, i)))
        for f, i in sorted(ready):
            end = fleets[f].sim.start_step(fleets[f].reps[i], t)
            if end is not None:
                clock.start((f, i), t, end)
    return [f.result() for f in fleets]


class _Fleet:
    """One engine's replicas and the requests still to reach them."""

    def __init__(self, run: EngineRun, cost_model: CostModel, server: bool):
        model, cfg, requests = run.model, run.config, run.requests
        self.index = {name: i for i, name in enumerate(model.variants)}
        unknown = sorted({r.variant for r in requests} - set(self.index))
        if unknown:
            raise ValueError(f"requests name unknown variants {unknown}; the model serves {list(self.index)}")
        self.sim, self.cfg, self.requests = _Engine(model, cost_model, cfg, server), cfg, requests
        page_bytes = cfg.page_size * model.kv_bytes_per_token
        self.num_pages = max(1, int(cfg.kv_cache_bytes // page_bytes)) if page_bytes else 1 << 62
        self.capacity = (self.num_pages // model.num_kv_layers) * cfg.page_size if model.num_kv_layers else 1 << 62
        self.reps = [self.sim.replica(i, self.num_pages) for i in range(run.replicas)]
        self.order = sorted(range(len(requests)), key=lambda i: (requests[i].arrival_s, i))
        self.records = [RequestRecord(i, r.variant, r.arrival_s, r.prompt_tokens, r.output_tokens)
                        for i, r in enumerate(requests)]
        self.due = [requests[i].arrival_s + self.sim.request_s for i in self.order]  # seen once parsed
        self.nxt = 0

    @property
    def next_due(self) -> float:
        return self.due[self.nxt] if self.nxt < len(self.order) else math.inf

    def arrive(self, now: float) -> list[int]:
        """Route the requests due by `now`; the replicas they went to."""
        out = []
        while self.nxt < len(self.order) and self.due[self.nxt] <= now:
            j = self.order[self.nxt]
            i = _route(self.reps, self.records[j], self.requests[j], self.index, self.cfg, self.capacity, now)
            if i is not None:
                self.sim.server_request(self.reps[i], now)
                out.append(i)
            self.nxt += 1
        return out

    def result(self) -> SimResult:
        makespan = max((r.finish_s for r in self.records if r.finish_s is not None), default=0.0)
        return SimResult(self.records, [(r.busy_s, r.num_steps, r.preemptions) for r in self.reps], makespan,
                         capacity_tokens=self.capacity, num_pages=self.num_pages)


def step_time(model: SimModel, cost_model: CostModel, batch: Sequence[tuple],
              engine: Optional[EngineConfig] = None) -> float:
    """Simulated seconds of one engine step over `batch`: per sequence, in admission order, (variant,
    tokens it has including the pending ones, tokens already in the KV cache[, tokens the step computes:
    default all pending ones]).

    `planc profile` fits the runtime's overheads against measured steps with this, so the fit charges
    them exactly as the simulator does.
    """
    index = {name: i for i, name in enumerate(model.variants)}
    work = []
    for i, (v, total, cached, *scheduled) in enumerate(batch):
        seq = SimSeq(RequestRecord(i, v, 0.0, total, 1), index[v], total, 1, computed=cached)
        seq.scheduled = scheduled[0] if scheduled else total - cached
        work.append(seq)
    return StepModel(model, cost_model, engine or EngineConfig()).step_time(work)


def _route(reps: list[_Replica], rec: RequestRecord, req: Request, index: dict[str, int], cfg: EngineConfig,
           capacity: int, now: float) -> Optional[int]:
    """Queue a request on the least-loaded replica; refuse it as the server would (400 too long, 429 full)."""
    if req.prompt_tokens + req.output_tokens > min(cfg.max_model_len, capacity):
        rec.status, rec.finish_s = "rejected", now
        return None
    r = min(reps, key=lambda x: (x.load, x.index))
    if len(r.waiting) >= cfg.max_queue:
        rec.status, rec.finish_s = "refused", now
        return None
    rec.replica = r.index
    r.waiting.append(SimSeq(rec, index[req.variant], req.prompt_tokens, req.output_tokens))
    return r.index
