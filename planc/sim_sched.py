"""The scheduling policy of planc's engine (`planc.runtime.engine.Engine`), once for both simulators.

`planc.simulate` (one engine per replica, one forward per step) and `planc.sim_stages` (one engine
whose lanes walk stages served by actors) differ in where a sequence's KV lives and in what a step
is; what the engine decides is the same, and lives here: admission under max_running and the token
budget, KV reserved for a sequence all at once or not at all (oldest first, preempting by recompute
the most recently admitted sequence that is not in flight), the step's token budget (one token per
decode first, then prompt chunks, each in admission order), sampling a token once a sequence's
pending tokens are computed, and finishing. A simulator subclasses `Scheduler` with its KV pool
(`_reserve_kv`, `_free_kv`) and drives the steps.

>>> from planc.runtime.engine import EngineConfig
>>> from planc.sim_report import RequestRecord
>>> class Roomy(Scheduler):
...     def _reserve_kv(self, seq): return True
...     def _free_kv(self, seq): pass
>>> sched = Roomy(EngineConfig(max_batch_tokens=8), token_s=0.0)
>>> sched.waiting.extend(SimSeq(RequestRecord(i, "a", 0.0, 6, 1), 0, 6, 1) for i in range(2))
>>> sched.admit()
>>> [s.scheduled for s in sched.reserve(sched.running, 0.0)]  # the second prompt gets what is left
[6, 2]
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any, Optional

from planc.runtime.engine import EngineConfig
from planc.sim_report import RequestRecord


@dataclass(eq=False, slots=True)
class SimSeq:
    record: RequestRecord
    variant: Any
    """What the simulator's step model reads: the variant's index in its model, or its name."""
    prompt: int
    max_tokens: int
    generated: int = 0
    total: int = 0
    """prompt + generated: every token the sequence has, the pending one included."""
    computed: int = 0
    """Tokens whose K/V are cached (0 again after a preemption)."""
    pages: int = 0
    """Pages held in each KV layer (of every stage, where the chain is cut into stages)."""
    admitted: int = 0
    """Admission order (the engine compares admission times)."""
    scheduled: int = 0
    """Tokens this step computes: all pending ones, or a prompt chunk (chunked prefill)."""
    copies: Optional[list] = None
    """Staged runs: per stage the copy it sticks to (None until its KV is reserved, and again once freed)."""
    in_flight: bool = False
    """Staged runs: in a lane that has not sampled yet (never preempted meanwhile)."""

    def __post_init__(self) -> None:
        self.total = self.prompt + self.generated

    @property
    def pending(self) -> int:
        return self.total - self.computed


class Scheduler:
    """One engine's queues and scheduling decisions; subclasses say where a sequence's KV pages go."""

    def __init__(self, config: EngineConfig, token_s: float = 0.0):
        self.cfg = config
        self.token_s = token_s
        """The HTTP server's time to stream one token (0 for the engine alone)."""
        self.waiting: deque[SimSeq] = deque()
        self.running: list[SimSeq] = []
        self.preemptions = 0
        self._admissions = 0

    def _reserve_kv(self, seq: SimSeq) -> bool:
        """Grow `seq` to hold all its tokens, or change nothing."""
        raise NotImplementedError

    def _free_kv(self, seq: SimSeq) -> None:
        raise NotImplementedError

    def admit(self) -> None:
        """Admit while this step has tokens left (prompts are chunked, so any admitted prompt makes progress)."""
        cap = self.cfg.max_batch_tokens
        budget = cap - sum(min(s.pending, cap) for s in self.running)
        while self.waiting and len(self.running) < self.cfg.max_running and (budget > 0 or not self.running):
            seq = self.waiting[0]
            if not self._reserve_kv(seq):
                break
            self.waiting.popleft()
            self._admissions += 1
            seq.admitted = self._admissions
            self.running.append(seq)
            budget -= seq.pending

    def reserve(self, candidates: list[SimSeq], now: float) -> list[SimSeq]:
        """Reserve KV for `candidates`, oldest first, preempting the newest running sequence not in flight
        while one does not fit; those reserved, with their share of the step's token budget."""
        work = []
        for seq in sorted(candidates, key=lambda s: s.admitted):
            if seq not in self.running:
                continue  # preempted below, while making room for an older sequence
            while not self._reserve_kv(seq):
                victim = max((s for s in self.running if s is not seq and not s.in_flight),
                             key=lambda s: s.admitted, default=None)
                if victim is None:
                    # alone it does not fit: cannot happen for requests that passed the capacity check
                    if not any(s.in_flight for s in self.running):
                        self._finish(seq, now, "error")
                    break
                self._preempt(victim)
            else:
                work.append(seq)
        return self._schedule([s for s in work if s in self.running])

    def _schedule(self, work: list[SimSeq]) -> list[SimSeq]:
        """The step's token budget: one token per decode first, then prompt chunks, each in admission order."""
        budget, out = self.cfg.max_batch_tokens, []
        for seq in sorted(work, key=lambda s: s.pending > 1):  # stable sort: admission order within each
            seq.scheduled = min(seq.pending, budget)
            if seq.scheduled:
                out.append(seq)
                budget -= seq.scheduled
        return out

    def _preempt(self, seq: SimSeq) -> None:
        self._free_kv(seq)
        seq.computed = 0
        self.running.remove(seq)
        self.waiting.appendleft(seq)
        self.preemptions += 1
        seq.record.num_preemptions += 1

    def sample(self, work: list[SimSeq], now: float) -> int:
        """Every sequence whose pending tokens `work` completed samples one token at `now`; over HTTP the
        client sees it when the server thread has streamed the tokens before it and this one. Returns
        how many sampled."""
        sampled = 0
        for seq in work:
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
                self._finish(seq, seen, "ok")
        return sampled

    def _finish(self, seq: SimSeq, now: float, status: str) -> None:
        self._free_kv(seq)
        self.running.remove(seq)
        seq.record.finish_s = now
        seq.record.status = status
