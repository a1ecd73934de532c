"""How long one step of planc's engine takes in the simulator (`planc.simulate`): the per-step walk
over chain positions in which the sequences whose block there is the same block instance run as one
batched call (split at block_batch_cap), plus one delta call per LoRA adapter in the group.

A step lasts `CostModel.step_overhead()` plus the `CostModel.block_time` of every call (num_seqs = the
sequences in it; the head computes one row per sequence, as the runtime does), plus, per attention
call the executor makes apart from the batched Linears: the profile's block_call_us for each prefill
segment and for a lone decode, and decode_call_us for the one batched call of two or more decodes.
That batched call gathers every sequence's K/V up to the longest context in it
(`kernels.reference.decode_attention`), so its attention and KV traffic are charged at the longest
context times the decodes, not at the sum of their contexts.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

from planc.cost import BlockCost, CostModel
from planc.runtime.engine import EngineConfig
from planc.sim_model import Group, SimModel

_PREFILL_TOKENS, _PREFILL_PAIRS, _PREFILL_SEQS, _DECODES, _PREFILL_CONTEXT, _DECODE_CONTEXT, _LONGEST = range(7)
"""Per variant (and per block call, summed over its variants) the counters of a step's work; the last is a max."""


class StepModel:
    """Step times of one engine configuration on one cost model (block calls are memoized)."""

    def __init__(self, model: SimModel, cost_model: CostModel, config: EngineConfig):
        self.cm, self.cfg = cost_model, config
        self._calls: dict[tuple, float] = {}
        self._positions = _Position.build_all(model)
        ov = cost_model.device.overheads
        self._call_overhead = ov.block_call_us * 1e-6
        self._decode_call_overhead = ov.decode_call_us * 1e-6

    def step_time(self, work: Sequence) -> float:
        """step overhead + every batched block call (and adapter delta call) of a step over `work`:
        sequences in admission order, each with .variant (index), .computed and .scheduled tokens."""
        active: dict[int, list[float]] = {}
        for s in work:
            _add_pending(active.setdefault(s.variant, [0.0] * 7), s)
        total = self.cm.step_overhead()
        by_partition: dict[int, dict[int, list[float]]] = {}  # positions that group variants alike share sums
        for pos in self._positions:
            calls = by_partition.get(pos.partition)
            if calls is None:
                calls = by_partition[pos.partition] = _group_sums(active, pos.group_of)
            total += pos.count * self._position_time(pos, calls, active, work)
        return total

    def _position_time(self, pos: "_Position", calls: dict[int, list[float]], active: dict[int, list[float]],
                       work: Sequence) -> float:
        t, split = 0.0, set()
        for g, agg in calls.items():
            if agg[_PREFILL_SEQS] + agg[_DECODES] > self.cfg.block_batch_cap:
                split.add(g)
                t += self._split_time(pos, g, work)
            else:
                t += self._call(pos.costs[g], agg)
        if pos.deltas:
            rows: dict[int, list[float]] = {}
            for v, st in active.items():
                a = pos.adapter_of[v]
                if a >= 0 and pos.group_of[v] not in split:
                    r = rows.setdefault(a, [0.0] * 7)
                    r[_PREFILL_TOKENS] += st[_PREFILL_TOKENS]
                    r[_DECODES] += st[_DECODES]
            for a, r in rows.items():
                t += self._call(pos.deltas[a], r, adapter=True)
        return t

    def _split_time(self, pos: "_Position", g: int, work: Sequence) -> float:
        """A group larger than block_batch_cap runs as several calls, in admission order (as the engine)."""
        members = [s for s in work if pos.group_of[s.variant] == g]
        cap, t = self.cfg.block_batch_cap, 0.0
        for i in range(0, len(members), cap):
            active: dict[int, list[float]] = {}
            for s in members[i:i + cap]:
                _add_pending(active.setdefault(s.variant, [0.0] * 7), s)
            t += self._position_time(pos, _group_sums(active, pos.group_of), active, members[i:i + cap])
        return t

    def _call(self, cost: BlockCost, agg: list[float], adapter: bool = False) -> float:
        prefill_tokens, pairs, prefill_seqs, decodes = agg[:4]
        seqs = prefill_seqs + decodes
        # a batched decode call gathers K/V up to its longest context for every decode in it
        decode_context = agg[_LONGEST] * decodes if decodes >= 2 else agg[_DECODE_CONTEXT]
        context = agg[_PREFILL_CONTEXT] + decode_context
        if cost.kind == "head":
            # the runtime computes logits for each sequence's last token only
            prefill_tokens, pairs, decodes, context = 0, 0.0, seqs, 0.0
        key = (id(cost), prefill_tokens, pairs, seqs, decodes, context, adapter)
        cached = self._calls.get(key)
        if cached is None:
            num_seqs = 0 if adapter else int(seqs)
            cached = self.cm.block_time(cost, prefill_tokens=int(prefill_tokens), decode_seqs=int(decodes),
                                        context_tokens=context, attn_pairs=context + pairs, num_seqs=num_seqs)
            if cost.kv_bytes_per_token > 0 and not adapter:
                # The executor runs attention once per prefill segment and once for a lone decode; two or
                # more decodes share one batched call with its own fixed cost (what `planc profile` fits
                # with these counts).
                cached += prefill_seqs * self._call_overhead + \
                    (self._call_overhead if decodes == 1 else self._decode_call_overhead if decodes else 0.0)
            if len(self._calls) < 100_000:
                self._calls[key] = cached
        return cached


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
    """Per group (block call) its variants' counters summed (the longest context: the max)."""
    calls: dict[int, list[float]] = {}
    for v, st in active.items():
        acc = calls.get(group_of[v])
        if acc is None:
            calls[group_of[v]] = st[:]
        else:
            for i in range(_LONGEST):
                acc[i] += st[i]
            acc[_LONGEST] = max(acc[_LONGEST], st[_LONGEST])
    return calls


def _add_pending(st: list[float], s) -> None:
    """Add the tokens one sequence computes this step to its variant's counters."""
    n = s.scheduled
    if n == 1:  # the executor treats any one-token segment as a decode
        st[_DECODES] += 1
        st[_DECODE_CONTEXT] += s.computed + 1
        st[_LONGEST] = max(st[_LONGEST], s.computed + 1)
    else:
        st[_PREFILL_TOKENS] += n
        st[_PREFILL_PAIRS] += n * s.computed + n * (n + 1) / 2
        st[_PREFILL_SEQS] += 1
        st[_PREFILL_CONTEXT] += s.computed
