"""A discrete-event simulator of planc's own serving runtime.

It replays a workload through a model of `planc.runtime.engine.Engine` step by step: the same
admission order and limits (max_running, max_queue), the same token budget per step
(max_batch_tokens: one token per decode first, then prompt chunks in admission order, a prompt
longer than what is left being prefilled over several steps and sampling only when it is done), the
same all-or-nothing KV page reservation per sequence (page_size, the KV budget, pages per layer of
the chain), the same preemption by recompute of the most recently admitted sequence, and the same per-step walk over
chain positions in which the sequences whose block there is the same block instance run as one
batched call (split at block_batch_cap), plus one delta call per LoRA adapter in the group. A step
lasts `CostModel.step_overhead()` plus the `CostModel.block_time` of every call (num_seqs = the
sequences in it; the head computes one row per sequence, as the runtime does), plus the profile's
block_call_us for every attention call a sequence makes on its own (each prefill in a layer, or a
lone decode). Data-parallel replicas are independent engines; each request goes to the least-loaded
one (waiting + running) when it arrives.

Inside `planc serve` (the default; `server=False` for the engine alone) each replica's process also
runs the HTTP server's asyncio thread: it parses each request before the engine sees it and streams
each token after the step that sampled it, holding the GIL for the profile's server_request_us and
server_token_us. The engine thread holds the GIL only for its Python work (the profile's overheads)
and releases it inside torch ops (the roofline or matmul-table part of a step), so the server's
queued work runs in a step's compute time on the other core and lengthens the step only by what
does not fit there; a token reaches the client when the server has streamed it.

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

import heapq
import math
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Optional, Sequence

from planc.cost import BlockCost, CostModel
from planc.runtime.engine import EngineConfig
from planc.sim_model import Group, SimModel
from planc.sim_report import RequestRecord, SimResult
from planc.workload import Request

__all__ = ["simulate", "step_time", "SimModel", "SimResult", "RequestRecord", "EngineConfig"]


@dataclass(eq=False, slots=True)
class _Seq:
    record: RequestRecord
    variant: int
    prompt: int
    max_tokens: int
    generated: int = 0
    total: int = 0
    """prompt + generated: every token the sequence has, the pending one included."""
    computed: int = 0
    """Tokens whose K/V are cached (0 again after a preemption)."""
    pages: int = 0
    """Pages held in each KV layer."""
    admitted: int = 0
    """Admission order (the engine compares admission times)."""
    scheduled: int = 0
    """Tokens this step computes: all pending ones, or a prompt chunk (chunked prefill)."""

    def __post_init__(self) -> None:
        self.total = self.prompt + self.generated

    @property
    def pending(self) -> int:
        return self.total - self.computed


@dataclass
class _Replica:
    index: int
    num_pages: int
    waiting: deque = field(default_factory=deque)
    running: list = field(default_factory=list)
    work: list = field(default_factory=list)
    busy_s: float = 0.0
    num_steps: int = 0
    preemptions: int = 0
    server_work_s: float = 0.0
    """GIL-holding work queued on the server's asyncio thread (tokens to stream, requests to parse)."""
    server_since: float = 0.0
    """When that work was last brought up to date (it drains while the engine is idle)."""

    def __post_init__(self) -> None:
        self.free = self.num_pages

    @property
    def load(self) -> int:
        return len(self.waiting) + len(self.running)


class _Engine:
    """One replica's scheduling decisions, mirroring planc.runtime.engine.Engine."""

    def __init__(self, model: SimModel, cost_model: CostModel, config: EngineConfig, server: bool = False):
        self.model, self.cm, self.cfg = model, cost_model, config
        self._admissions = 0
        self._calls: dict[tuple, tuple[float, float]] = {}
        self._positions = _Position.build_all(model)
        ov = cost_model.device.overheads
        self._call_overhead = ov.block_call_us * 1e-6
        self.token_s = ov.server_token_us * 1e-6 if server else 0.0
        self.request_s = ov.server_request_us * 1e-6 if server else 0.0
        self._gil = 0.0
        """The engine's GIL-holding share of the step being timed (its overheads; see step_time)."""

    def _reserve_kv(self, r: _Replica, seq: _Seq) -> bool:
        """Grow `seq` to hold all its tokens in every KV layer, or change nothing."""
        need = -(-seq.total // self.cfg.page_size)
        if need <= seq.pages:
            return True
        extra = self.model.num_kv_layers * (need - seq.pages)
        if extra > r.free:
            return False
        r.free -= extra
        seq.pages = need
        return True

    def _free_kv(self, r: _Replica, seq: _Seq) -> None:
        r.free += seq.pages * self.model.num_kv_layers
        seq.pages = 0

    # ------------------------------------------------------------------ one step
    def start_step(self, r: _Replica, now: float) -> Optional[float]:
        """Admit, reserve KV (preempting), and return when the step's forward ends (None: idle)."""
        while True:
            self._admit(r)
            if not r.running:
                return None
            r.work = self._reserve(r, now)
            if r.work:
                break
        duration = self.step_time(r.work)
        if self.token_s or self.request_s:
            duration = self._with_server(r, now, duration)
        r.busy_s += duration
        r.num_steps += 1
        return now + duration

    def _with_server(self, r: _Replica, now: float, duration: float) -> float:
        """The step as it runs beside `planc serve`'s asyncio thread in one process: both need the GIL.
        The engine holds it for its Python work (the profile's overheads) and releases it inside torch
        ops (the roofline or matmul-table part); the server's queued work runs in those windows on the
        other core, and what does not fit there takes the GIL from the engine and lengthens the step."""
        backlog = max(0.0, r.server_work_s - (now - r.server_since))  # it drained while the engine idled
        compute = duration - self._gil
        r.server_work_s, r.server_since = 0.0, now
        return duration + max(0.0, backlog - compute)

    def server_request(self, r: _Replica, now: float) -> None:
        """A request's parsing and setup joins the server thread's queue."""
        self._add_server_work(r, now, self.request_s)

    def _add_server_work(self, r: _Replica, now: float, seconds: float) -> None:
        r.server_work_s = max(0.0, r.server_work_s - (now - r.server_since)) + seconds
        r.server_since = now

    def _admit(self, r: _Replica) -> None:
        """Admit while this step has tokens left (prompts are chunked, so any admitted prompt makes progress)."""
        cap = self.cfg.max_batch_tokens
        budget = cap - sum(min(s.pending, cap) for s in r.running)
        while r.waiting and len(r.running) < self.cfg.max_running and (budget > 0 or not r.running):
            seq = r.waiting[0]
            if not self._reserve_kv(r, seq):
                break
            r.waiting.popleft()
            self._admissions += 1
            seq.admitted = self._admissions
            r.running.append(seq)
            budget -= seq.pending

    def _reserve(self, r: _Replica, now: float) -> list[_Seq]:
        work = []
        for seq in sorted(r.running, key=lambda s: s.admitted):
            if seq not in r.running:
                continue  # preempted below, while making room for an older sequence
            while not self._reserve_kv(r, seq):
                others = [s for s in r.running if s is not seq]
                if not others:  # cannot happen for requests that passed the capacity check
                    self._finish(r, seq, now, "error")
                    break
                self._preempt(r, max(others, key=lambda s: s.admitted))
            else:
                work.append(seq)
        return self._schedule([s for s in work if s in r.running])

    def _schedule(self, work: list[_Seq]) -> list[_Seq]:
        """The step's token budget: one token per decode first, then prompt chunks, each in admission order."""
        budget, out = self.cfg.max_batch_tokens, []
        for seq in sorted(work, key=lambda s: s.pending > 1):  # stable sort: admission order within each
            seq.scheduled = min(seq.pending, budget)
            if seq.scheduled:
                out.append(seq)
                budget -= seq.scheduled
        return out

    def _preempt(self, r: _Replica, seq: _Seq) -> None:
        self._free_kv(r, seq)
        seq.computed = 0
        r.running.remove(seq)
        r.waiting.appendleft(seq)
        r.preemptions += 1
        seq.record.num_preemptions += 1

    def end_step(self, r: _Replica, now: float) -> None:
        """Every sequence whose pending tokens the step completed samples one token at `now`; over HTTP the
        client sees it when the server thread has streamed the tokens before it and this one."""
        sampled = 0
        for seq in r.work:
            seq.computed += seq.scheduled
            if seq.pending:
                continue  # a prompt chunk: no token yet
            seq.generated += 1
            seq.total += 1
            sampled += 1
            rec = seq.record
            seen = now + sampled * self.token_s
            if rec.first_token_s is None:
                rec.first_token_s = seen
            rec.last_token_s = seen
            rec.num_tokens = seq.generated
            if seq.generated >= seq.max_tokens or seq.total >= self.cfg.max_model_len:
                self._finish(r, seq, seen, "ok")
        if sampled and self.token_s:
            self._add_server_work(r, now, sampled * self.token_s)
        r.work = []

    def _finish(self, r: _Replica, seq: _Seq, now: float, status: str) -> None:
        self._free_kv(r, seq)
        r.running.remove(seq)
        seq.record.finish_s = now
        seq.record.status = status

    # ------------------------------------------------------------------ step time
    def step_time(self, work: list[_Seq]) -> float:
        """step overhead + every batched block call (and adapter delta call) of the step. Leaves in
        `self._gil` the part of it that is the runtime's overheads (Python, holding the GIL)."""
        active: dict[int, list[float]] = {}
        for s in work:
            _add_pending(active.setdefault(s.variant, [0.0] * 5), s)
        total = self._gil = self.cm.step_overhead()
        by_partition: dict[int, dict[int, list[float]]] = {}  # positions that group variants alike share sums
        for pos in self._positions:
            calls = by_partition.get(pos.partition)
            if calls is None:
                calls = by_partition[pos.partition] = _group_sums(active, pos.group_of)
            gil = self._gil
            t = self._position_time(pos, calls, active, work)
            total += pos.count * t
            self._gil = gil + pos.count * (self._gil - gil)
        return total

    def _position_time(self, pos: "_Position", calls: dict[int, list[float]], active: dict[int, list[float]],
                       work: list[_Seq]) -> float:
        t, split = 0.0, set()
        for g, agg in calls.items():
            if agg[2] + agg[3] > self.cfg.block_batch_cap:
                split.add(g)
                t += self._split_time(pos, g, work)
            else:
                t += self._call(pos.costs[g], *agg)
        if pos.deltas:
            rows: dict[int, list[float]] = {}
            for v, st in active.items():
                a = pos.adapter_of[v]
                if a >= 0 and pos.group_of[v] not in split:
                    r = rows.setdefault(a, [0.0, 0.0])
                    r[0] += st[0]
                    r[1] += st[3]
            for a, (prefill, decodes) in rows.items():
                t += self._call(pos.deltas[a], prefill, 0.0, 0.0, decodes, 0.0, adapter=True)
        return t

    def _split_time(self, pos: "_Position", g: int, work: list[_Seq]) -> float:
        """A group larger than block_batch_cap runs as several calls, in admission order (as the engine)."""
        members = [s for s in work if pos.group_of[s.variant] == g]
        cap, t = self.cfg.block_batch_cap, 0.0
        for i in range(0, len(members), cap):
            active: dict[int, list[float]] = {}
            for s in members[i:i + cap]:
                _add_pending(active.setdefault(s.variant, [0.0] * 5), s)
            t += self._position_time(pos, _group_sums(active, pos.group_of), active, members[i:i + cap])
        return t

    def _call(self, cost: BlockCost, prefill_tokens: float, prefill_pairs: float, prefill_seqs: float,
              decode_seqs: float, context: float, adapter: bool = False) -> float:
        seqs = prefill_seqs + decode_seqs
        if cost.kind == "head":
            # the runtime computes logits for each sequence's last token only
            prefill_tokens, prefill_pairs, decode_seqs, context = 0, 0.0, seqs, 0.0
        key = (id(cost), prefill_tokens, prefill_pairs, seqs, decode_seqs, context, adapter)
        cached = self._calls.get(key)
        if cached is None:
            num_seqs = 0 if adapter else int(seqs)
            t = self.cm.block_time(cost, prefill_tokens=int(prefill_tokens), decode_seqs=int(decode_seqs),
                                   context_tokens=context, attn_pairs=context + prefill_pairs, num_seqs=num_seqs)
            gil = self.cm.overhead_time(int(prefill_tokens), int(decode_seqs), num_seqs)
            if cost.kv_bytes_per_token > 0 and not adapter:
                # The executor runs attention once per prefill segment and once for a lone decode (two or
                # more decodes share one batched call); each such call costs about what a block call
                # costs in fixed overhead (what `planc profile` fits with this count).
                own = (prefill_seqs + (decode_seqs == 1)) * self._call_overhead
                t, gil = t + own, gil + own
            cached = (t, gil)
            if len(self._calls) < 100_000:
                self._calls[key] = cached
        self._gil += cached[1]
        return cached[0]


@dataclass(frozen=True)
class _Position:
    """A compressed chain position with lookup tables for the step loop."""

    count: int
    costs: tuple[BlockCost, ...]
    """Per group (block instance)."""
    group_of: tuple[int, ...]
    """Variant index -> group index."""
    deltas: tuple[BlockCost, ...]
    adapter_of: tuple[int, ...]
    """Variant index -> index into `deltas`, or -1."""
    partition: int = 0
    """Positions with equal `group_of` have equal ids."""

    @classmethod
    def build(cls, count: int, groups: tuple[Group, ...], num_variants: int) -> "_Position":
        group_of, adapter_of, deltas = [0] * num_variants, [-1] * num_variants, []
        for g, group in enumerate(groups):
            for v in group.variants:
                group_of[v] = g
            for delta, users in group.adapters:
                for v in users:
                    adapter_of[v] = len(deltas)
                deltas.append(delta)
        return cls(count, tuple(g.cost for g in groups), tuple(group_of), tuple(deltas), tuple(adapter_of))

    @staticmethod
    def build_all(model: SimModel) -> list["_Position"]:
        out, ids = [], {}
        for count, groups in model.positions:
            pos = _Position.build(count, groups, len(model.variants))
            out.append(replace(pos, partition=ids.setdefault(pos.group_of, len(ids))))
        return out


def _group_sums(active: dict[int, list[float]], group_of: tuple[int, ...]) -> dict[int, list[float]]:
    """Per group (block call) the sums of its variants' counters: prefill tokens, prefill query/key
    pairs, prefill sequences, decode sequences, cached context."""
    calls: dict[int, list[float]] = {}
    for v, st in active.items():
        acc = calls.get(group_of[v])
        if acc is None:
            calls[group_of[v]] = st[:]
        else:
            acc[0] += st[0]
            acc[1] += st[1]
            acc[2] += st[2]
            acc[3] += st[3]
            acc[4] += st[4]
    return calls


def _add_pending(st: list[float], s: _Seq) -> None:
    """Add the tokens one sequence computes this step to its variant's counters (see _group_sums)."""
    n = s.scheduled
    if n == 1:  # the executor treats any one-token segment as a decode
        st[3] += 1
        st[4] += s.computed + 1
    else:
        st[0] += n
        st[1] += n * s.computed + n * (n + 1) / 2
        st[2] += 1
        st[4] += s.computed


def simulate(model: SimModel, cost_model: CostModel, requests: Sequence[Request],
             engine: Optional[EngineConfig] = None, replicas: int = 1, server: bool = True) -> SimResult:
    """Serve `requests` (in arrival order) on `replicas` copies of an engine with `engine` settings.

    `server`: each replica runs inside `planc serve`, whose asyncio thread parses requests and streams
    tokens (the profile's server_request_us and server_token_us) under the GIL the engine thread also
    needs; False simulates the engine alone, as a benchmark that calls it in-process sees it."""
    cfg = engine or EngineConfig()
    if replicas < 1:
        raise ValueError("replicas must be >= 1")
    index = {name: i for i, name in enumerate(model.variants)}
    unknown = sorted({r.variant for r in requests} - set(index))
    if unknown:
        raise ValueError(f"requests name unknown variants {unknown}; the model serves {list(index)}")
    sim = _Engine(model, cost_model, cfg, server)
    page_bytes = cfg.page_size * model.kv_bytes_per_token
    num_pages = max(1, int(cfg.kv_cache_bytes // page_bytes)) if page_bytes else 1 << 62
    capacity = (num_pages // model.num_kv_layers) * cfg.page_size if model.num_kv_layers else 1 << 62
    reps = [_Replica(i, num_pages) for i in range(replicas)]
    order = sorted(range(len(requests)), key=lambda i: (requests[i].arrival_s, i))
    records = [RequestRecord(i, r.variant, r.arrival_s, r.prompt_tokens, r.output_tokens) for i, r in enumerate(requests)]
    busy: list[tuple[float, int]] = []  # (step end, replica)
    due = [requests[i].arrival_s + sim.request_s for i in order]  # the engine sees a request once it is parsed
    nxt = 0
    while nxt < len(order) or busy:
        t = min(busy[0][0] if busy else math.inf, due[nxt] if nxt < len(order) else math.inf)
        ready = set()
        while busy and busy[0][0] <= t:
            _, i = heapq.heappop(busy)
            sim.end_step(reps[i], t)
            ready.add(i)
        while nxt < len(order) and due[nxt] <= t:
            i = _route(reps, records[order[nxt]], requests[order[nxt]], index, cfg, capacity, t)
            if i is not None:
                sim.server_request(reps[i], t)
                if not any(j == i for _, j in busy):
                    ready.add(i)
            nxt += 1
        for i in sorted(ready):
            end = sim.start_step(reps[i], t)
            if end is not None:
                heapq.heappush(busy, (end, i))
    makespan = max((r.finish_s for r in records if r.finish_s is not None), default=0.0)
    return SimResult(records, [(r.busy_s, r.num_steps, r.preemptions) for r in reps], makespan,
                     capacity_tokens=capacity, num_pages=num_pages)


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
        seq = _Seq(RequestRecord(i, v, 0.0, total, 1), index[v], total, 1, computed=cached)
        seq.scheduled = scheduled[0] if scheduled else total - cached
        work.append(seq)
    return _Engine(model, cost_model, engine or EngineConfig()).step_time(work)


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
    r.waiting.append(_Seq(rec, index[req.variant], req.prompt_tokens, req.output_tokens))
    return r.index
