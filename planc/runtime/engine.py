"""The engine: iteration-level (continuous) batching with per-block batching across variants.

Each step every running sequence advances by one forward pass: a chunk of its prompt, or one
decode token. The step walks the chain positions in order; at each position the sequences whose
block there is the same block instance run as one batch (capped per block), so variants that share
a block share its matmuls. KV lives in a paged cache; when it is full the most recently admitted
sequence is preempted (its KV freed, recomputed later) and nothing is dropped.

When the stages run concurrently (each in its own process, e.g. Ray actors), the engine pipelines
them: the running sequences are split into lanes, and while one lane's step is in stage 2 the next
lane's step runs in stage 1 (as vLLM's virtual engines do for pipeline parallelism). How many lanes
is a policy (`EngineConfig.lanes`): one per stage keeps every stage busy, but each stage then runs
each step as several smaller calls, and a decode call streams all its weights whatever its batch;
where stages share devices there is nothing to overlap in exchange. `planc serve` takes the count
the planner chose for the bundle's plan (`plan_lanes`, `planc.lane_model`), and one per stage
without a plan.
"""
from __future__ import annotations

import itertools
import queue
import threading
import time
import traceback
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch
from planc.bundle import Bundle
from planc.kernels import KernelSelection
from planc.runtime import executor as ex
from planc.runtime.stage import BlockCall, PendingCalls, Stage, StageFailed, local_stages
from planc.runtime.sampling import Sampler, SamplingParams


@dataclass
class EngineConfig:
    kv_cache_bytes: int = 64 * 2**20
    page_size: int = 16
    max_running: int = 64
    """Sequences decoding at once."""
    max_batch_tokens: int = 512
    """Tokens per step: one per decoding sequence first, then prompt chunks in admission order; a prompt
    longer than what is left is prefilled over several steps (chunked prefill). It bounds a step's
    activation memory and how long a prefill stalls the decodes beside it."""
    block_batch_cap: int = 256
    """Most sequences one block runs in one batched call; larger groups are split."""
    max_queue: int = 256
    """Waiting requests before new ones are refused (HTTP 429)."""
    max_model_len: int = 2048
    block_caps: dict[str, int] = field(default_factory=dict)
    """Block instance key -> its own batch cap (from the bundle's plan); others use block_batch_cap."""
    stage_positions: Optional[list[range]] = None
    """Chain positions of each in-process stage (from the bundle's plan); default: one stage."""
    stage_timeout_s: float = 30.0
    """How long a failed out-of-process stage may take to come back before its requests fail (503)."""
    lanes: Optional[int] = None
    """Lanes of sequences in flight through concurrent stages, at most one per stage (more are not
    used); None: one per stage. `planc serve` sets it from the bundle's plan (`plan_lanes`)."""

    def __post_init__(self):
        if self.lanes is not None and self.lanes < 1:
            raise ValueError(f"lanes must be at least 1, got {self.lanes}")


def plan_lanes(plan, num_stages: int) -> int:
    """The lanes an engine over `num_stages` stages keeps for `plan`, between 1 and `num_stages`: what
    the planner chose for it (`settings["lanes"]`, `planc.lane_model`: the count whose engine capacity
    its step costs predict highest); for a plan without that, its deepest pipeline (the
    largest `pp` of any group's layout).

    >>> from types import SimpleNamespace
    >>> plan = SimpleNamespace(groups=[{"layouts": [{"pp": 1}, {"pp": 4}]}, {"layouts": [{"pp": 2}]}, {"layouts": []}])
    >>> plan_lanes(plan, 6), plan_lanes(plan, 3), plan_lanes(SimpleNamespace(groups=[]), 2)
    (4, 3, 1)
    >>> plan_lanes(SimpleNamespace(groups=plan.groups, settings={"lanes": 2}), 6)
    2
    """
    chosen = (getattr(plan, "settings", None) or {}).get("lanes")
    depth = chosen or max((int(lay.get("pp", 1)) for g in plan.groups for lay in g["layouts"]), default=1)
    return max(1, min(int(depth), num_stages))


@dataclass
class Event:
    """What a request's sink receives: a new token, and/or the end of the sequence."""

    token_id: Optional[int]
    finished: bool = False
    finish_reason: Optional[str] = None
    """`stop` (eos), `length` (max_tokens or context), `abort`, `error`, `unavailable` (a stage stayed down)."""
    error: Optional[str] = None


@dataclass(eq=False)  # identity: two sequences with equal fields are still two requests
class Sequence:
    id: int
    variant: str
    prompt_ids: list[int]
    params: SamplingParams
    sink: Callable[[Event], None]
    sampler: Sampler
    eos_ids: frozenset[int]
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0
    """Tokens whose K/V are in the cache."""
    scheduled: int = 0
    """Tokens this step computes (all pending ones, or a prompt chunk)."""
    admitted_at: float = 0.0

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        """len(all_ids), without building the list (asked for every sequence at every step)."""
        return len(self.prompt_ids) + len(self.output_ids)

    def num_pending(self) -> int:
        return self.num_tokens - self.num_computed

    def scheduled_ids(self) -> torch.Tensor:
        """The ids this step computes: a prompt chunk, or at decode the last output token."""
        start, end, prompt = self.num_computed, self.num_computed + self.scheduled, len(self.prompt_ids)
        if start >= prompt:  # decoding: no copy of the whole sequence
            return torch.tensor(self.output_ids[start - prompt:end - prompt])
        return torch.tensor(self.all_ids[start:end])


class QueueFull(Exception):
    """The waiting queue is at its limit; the caller should retry later."""


class Engine:
    """Schedules sequences over stages. `stages` default to one in-process stage holding every block."""

    def __init__(self, bundle: Bundle, config: Optional[EngineConfig] = None, stats: Optional["StepStats"] = None,
                 stages: Optional[list[Stage]] = None, kernels: Optional[KernelSelection] = None):
        """`kernels` picks the op implementations of the default stages (default: PLANC_KERNELS, else auto)."""
        self.bundle, self.config = bundle, config or EngineConfig()
        self.stats = stats or StepStats()
        self.stages = stages or local_stages(bundle, self.config.kv_cache_bytes, self.config.page_size,
                                             positions=self.config.stage_positions, kernels=kernels)
        self.stage_of = {p: stage for stage in self.stages for p in stage.positions}
        self.stages.sort(key=lambda stage: stage.positions.start)  # a step walks them in chain order
        self.chains = {name: [(link["block"], link["adapter"]) for link in v["chain"]]
                       for name, v in bundle.variants.items()}
        assert sorted(self.stage_of) == list(range(len(next(iter(self.chains.values()))))), "stages must cover the chain"
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._inbox: "queue.Queue[Sequence]" = queue.Queue()
        self._aborts: "queue.Queue[int]" = queue.Queue()
        self._ids = itertools.count()
        self._wake = threading.Event()
        self._outage_since: Optional[float] = None
        self.pipelined = len(self.stages) > 1 and all(stage.concurrent for stage in self.stages)
        self.num_lanes = min(self.config.lanes or len(self.stages), len(self.stages))
        """Lanes in flight at most when pipelined."""
        self._lanes: deque[_Lane] = deque()
        """Lanes in flight through concurrent stages, the one waited on longest first."""
        self._in_flight: set[int] = set()
        self._free_later: set[int] = set()
        """Sequences that ended while in flight: their KV is freed when their lane comes back."""

    @property
    def num_unique_blocks(self) -> int:
        return len({key for chain in self.chains.values() for key, _ in chain})

    def kv_usage(self) -> float:
        return max(stage.usage() for stage in self.stages)

    def kv_pages(self) -> int:
        return sum(stage.cache.num_pages for stage in self.stages if stage.cache)

    def kv_free_pages(self) -> int:
        return sum(stage.cache.num_free for stage in self.stages if stage.cache)

    def _fits(self, seq: "Sequence") -> bool:
        return all(st.can_reserve(seq.id, seq.num_tokens, seq.variant) for st in self.stages)

    def _reserve_kv(self, seq: "Sequence") -> bool:
        """All stages or none (checked first, so no stage is left half-grown)."""
        if not self._fits(seq):
            return False
        for stage in self.stages:
            assert stage.reserve(seq.id, seq.num_tokens, seq.variant)
        return True

    def _free_kv(self, seq_id: int) -> None:
        for stage in self.stages:
            stage.free(seq_id)

    # ------------------------------------------------------------------ requests (any thread)
    def max_tokens_capacity(self) -> int:
        """Longest sequence the KV cache can hold on its own."""
        return min(stage.capacity_tokens() for stage in self.stages)

    def submit(self, variant: str, prompt_ids: list[int], params: SamplingParams,
               sink: Callable[[Event], None]) -> int:
        """Queue a request; raises QueueFull when the waiting queue is at its limit."""
        if self._inbox.qsize() + len(self.waiting) >= self.config.max_queue:
            raise QueueFull()
        eos = frozenset() if params.ignore_eos else frozenset(self.bundle.eos_token_ids(variant))
        seq = Sequence(next(self._ids), variant, list(prompt_ids), params, sink, Sampler(params), eos)
        self._inbox.put(seq)
        self._wake.set()
        return seq.id

    def abort(self, seq_id: int) -> None:
        """Stop a sequence and free its KV at the next step (e.g. the client went away)."""
        self._aborts.put(seq_id)
        self._wake.set()

    @property
    def num_waiting(self) -> int:
        return self._inbox.qsize() + len(self.waiting)

    # ------------------------------------------------------------------ the loop (engine thread)
    @contextmanager
    def in_thread(self) -> Iterator["Engine"]:
        """The loop in a daemon thread of this process for the block (in-process use: profiling,
        benchmarks); stopped and joined on exit. planc serve starts its own thread in its lifespan."""
        stop = threading.Event()
        thread = threading.Thread(target=self.run, args=(stop,), name="planc-engine", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            stop.set()
            thread.join(10)

    def run(self, stop: threading.Event) -> None:
        """The engine thread's loop. A failing step fails the sequences in it, not the server."""
        while not stop.is_set():
            try:
                busy = self.step()
                self._outage_since = None
            except StageFailed as exc:
                self._stage_failed(exc, stop)
                continue
            except Exception as exc:  # a bug must not leave every client waiting forever
                traceback.print_exc()
                self._drop_lanes()
                for seq in list(self.running) + list(self.waiting):
                    self._finish(seq, "error", error=f"{type(exc).__name__}: {exc}")
                continue
            if not busy:
                self._wake.wait(0.05)
                self._wake.clear()

    def _stage_failed(self, exc: StageFailed, stop: threading.Event) -> None:
        """A stage lost its KV: recompute every running sequence once it answers again (their clients
        see only a delay), or fail them all with `unavailable` if it stays down past the timeout."""
        now = time.monotonic()
        self._drop_lanes()
        if self._outage_since is None:
            self._outage_since = now
            print(f"planc: {exc}; recomputing {len(self.running)} running sequences when it is back", flush=True)
        for seq in sorted(self.running, key=lambda s: s.admitted_at, reverse=True):
            self._preempt(seq)  # newest first: the oldest ends up first in the waiting queue
        if now - self._outage_since > self.config.stage_timeout_s:
            for seq in list(self.waiting):
                self._finish(seq, "unavailable", error=str(exc))
            self._outage_since = None
        stop.wait(0.1)  # the stage is restarting; do not spin on it

    def has_work(self) -> bool:
        return bool(self.running or self.waiting or not self._inbox.empty() or self._lanes)

    def step(self) -> bool:
        """One iteration; returns False when there was nothing to do. Pipelined, an iteration starts
        lanes while fewer than `num_lanes` are in flight, then moves the oldest lane one stage on."""
        self._drain()
        self._admit()
        if not self.pipelined:
            if not self.running:
                return False
            work = self._reserve(self.running)
            if work:
                logits = self._forward(work)
                self._sample(work, logits)
            return True
        if not self.running and not self._lanes:
            return False
        share = -(-len(self.running) // self.num_lanes)  # a lane's share of the running sequences
        while len(self._lanes) < self.num_lanes:
            work = self._reserve([s for s in self.running if s.id not in self._in_flight][:share])
            if not work:
                break
            self._launch(work)
        if self._lanes:
            self._advance(self._lanes.popleft())
        return True

    def _drain(self) -> None:
        while not self._inbox.empty():
            self.waiting.append(self._inbox.get_nowait())
        aborted = set()
        while not self._aborts.empty():
            aborted.add(self._aborts.get_nowait())
        if aborted:
            for seq in [s for s in list(self.running) + list(self.waiting) if s.id in aborted]:
                self._finish(seq, "abort")

    def _admit(self) -> None:
        """Admit waiting sequences while this step has tokens left for them and their KV fits."""
        budget = self.config.max_batch_tokens - sum(min(s.num_pending(), self.config.max_batch_tokens)
                                                    for s in self.running)
        while self.waiting and len(self.running) < self.config.max_running and (budget > 0 or not self.running):
            seq = self.waiting[0]
            if not self._reserve_kv(seq):
                break
            self.waiting.popleft()
            seq.admitted_at = time.monotonic()
            self.running.append(seq)
            budget -= seq.num_pending()

    def _reserve(self, candidates: list[Sequence]) -> list[Sequence]:
        """Make room for the candidates' next tokens, preempting the newest sequence not in flight when
        full; a sequence that only in-flight ones crowd out waits for them."""
        work = []
        for seq in sorted(candidates, key=lambda s: s.admitted_at):
            if seq not in self.running:
                continue  # preempted below, while making room for an older sequence
            while not self._reserve_kv(seq):
                victim = max((s for s in self.running if s is not seq and s.id not in self._in_flight),
                             key=lambda s: s.admitted_at, default=None)
                if victim is None:
                    if not self._in_flight and not self._free_later:
                        self._finish(seq, "length", error="the KV cache cannot hold this sequence")
                    break
                self._preempt(victim)
            else:
                work.append(seq)
        return self._schedule([s for s in work if s in self.running])

    def _schedule(self, work: list[Sequence]) -> list[Sequence]:
        """Share the step's token budget: decodes first (one token each, in admission order), then
        prompt chunks in admission order. Sets each sequence's `scheduled`; returns those with tokens."""
        budget = self.config.max_batch_tokens
        out = []
        for seq in sorted(work, key=lambda s: s.num_pending() > 1):  # stable: admission order within each
            seq.scheduled = min(seq.num_pending(), budget)
            if seq.scheduled:
                out.append(seq)
                budget -= seq.scheduled
        return out

    def _preempt(self, seq: Sequence) -> None:
        self._free_kv(seq.id)
        seq.num_computed = 0
        self.running.remove(seq)
        self.waiting.appendleft(seq)
        self.stats.preemptions += 1

    # ------------------------------------------------------------------ pipelined stages
    def _launch(self, work: list[Sequence]) -> None:
        """Start a lane: its sequences' step in the first stage."""
        self._in_flight.update(s.id for s in work)
        inputs = {s.id: s.scheduled_ids() for s in work}
        first = self.stages[0]
        self._lanes.append(_Lane(work, 0, first.submit_calls(self._block_calls(first.positions, work), inputs)))

    def _advance(self, lane: "_Lane") -> None:
        """Wait for the lane's current stage, then hand it to the next one, or sample after the last."""
        out = lane.pending.result()
        for seq in lane.work:
            if seq.id in self._free_later:  # ended (aborted) meanwhile: no stage computes with it now
                self._free_later.discard(seq.id)
                self._free_kv(seq.id)
        lane.work = [s for s in lane.work if s in self.running]
        if lane.stage + 1 < len(self.stages) and lane.work:
            lane.stage += 1
            stage = self.stages[lane.stage]
            lane.pending = stage.submit_calls(self._block_calls(stage.positions, lane.work),
                                              {s.id: out[s.id] for s in lane.work})
            self._lanes.append(lane)
            return
        self._in_flight.difference_update(s.id for s in lane.work)
        self._sample(lane.work, out)

    def _drop_lanes(self) -> None:
        """Forget what is in flight (a stage failed: its sequences are recomputed)."""
        self._lanes.clear()
        self._in_flight.clear()
        for seq_id in self._free_later:
            self._free_kv(seq_id)
        self._free_later.clear()

    def _forward(self, work: list[Sequence]) -> dict[int, torch.Tensor]:
        """Run every sequence's pending tokens through its chain, one call per stage; logits of each
        one's last token (the last stage ends with the head)."""
        out: dict[int, torch.Tensor] = {s.id: s.scheduled_ids() for s in work}
        for stage in self.stages:
            out = stage.run_calls(self._block_calls(stage.positions, work), out)
        return out

    def _block_calls(self, positions: range, work: list[Sequence]) -> list[BlockCall]:
        """At each position, one batched call per block instance (split at its cap) holding every
        sequence whose chain runs that block there, whatever its variant."""
        calls = []
        for position in positions:
            groups: dict[str, list[Sequence]] = {}
            for s in work:
                groups.setdefault(self.chains[s.variant][position][0], []).append(s)
            for key, members in groups.items():
                cap = self.config.block_caps.get(key, self.config.block_batch_cap)
                for i in range(0, len(members), cap):
                    segments, start = [], 0
                    for s in members[i:i + cap]:
                        adapter = self.chains[s.variant][position][1]
                        segments.append(ex.Segment(s.id, start, s.scheduled, s.num_computed, adapter))
                        start += s.scheduled
                    calls.append(BlockCall(position, key, segments))
                    self.stats.record(key, members[i:i + cap])
        return calls

    def _sample(self, work: list[Sequence], logits: dict[int, torch.Tensor]) -> None:
        for seq in work:
            seq.num_computed += seq.scheduled
            if seq.num_pending():
                continue  # a prompt chunk: its logits are not a next token yet
            token = seq.sampler(logits[seq.id])
            if token in seq.eos_ids:
                self._finish(seq, "stop")
                continue
            seq.output_ids.append(token)
            seq.sink(Event(token))
            if len(seq.output_ids) >= seq.params.max_tokens:
                self._finish(seq, "length")
            elif seq.num_tokens >= self.config.max_model_len:
                self._finish(seq, "length")

    def _finish(self, seq: Sequence, reason: str, error: Optional[str] = None) -> None:
        if seq.id in self._in_flight:  # a stage may be computing with its KV right now
            self._in_flight.discard(seq.id)
            self._free_later.add(seq.id)
        else:
            self._free_kv(seq.id)
        if seq in self.running:
            self.running.remove(seq)
        if seq in self.waiting:
            self.waiting.remove(seq)
        seq.sink(Event(None, finished=True, finish_reason=reason, error=error))


@dataclass
class _Lane:
    """Sequences whose step is in flight through the stages; `pending` is the current stage's answer."""

    work: list[Sequence]
    stage: int
    pending: "PendingCalls"


@dataclass
class StepStats:
    """Counters the server exports as metrics; `on_batch` sees every batched block call."""

    preemptions: int = 0
    on_batch: Optional[Callable[[str, int, int], None]] = None
    """(block name, batch size, number of distinct variants in the batch)."""

    def record(self, key: str, members: list[Sequence]) -> None:
        if self.on_batch is not None:
            self.on_batch(key, len(members), len({s.variant for s in members}))
