"""cost: block groups and, for each, the candidate layouts with their time and memory on the target.

Reads the models (and the chains, when dedupe ran) and writes `program.groups` and
`program.plan_options`: per group, every (pipeline depth, tensor-parallel degree, decode batch)
that fits a device and meets the SLO, with per-stage memory, device time per request and replica
capacity from the cost model. Needs no weights: without chains, instances come from the spec's
`changes`/`lora` descriptions.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from typing import Optional

import numpy as np

from planc.cluster import Cluster, load_cluster
from planc.cost import BlockCost, CostModel, arch_block_costs
from planc.errors import SpecError
from planc.models.config import ArchConfig
from planc.pass_manager import Pass, PassContext
from planc.plan import BlockGroup, LoraUse, groups_from_instances, parse_changes, step_tokens
from planc.program import Program
from planc.workload import Request, load_workload

_LAYER_LINEARS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
_BATCHES = tuple(2 ** i for i in range(11))  # 1 .. 1024
PIPELINE_DEPTHS = (1, 2, 4, 8, 16)


@dataclass(frozen=True)
class Traffic:
    """What the planner plans for: variant shares and mean lengths."""

    shares: dict[str, float]
    prompt_tokens: float
    output_tokens: float
    rate: Optional[float] = None
    """Offered requests/s (from the workload or plan.rate)."""
    requests: tuple[Request, ...] = ()
    """The workload file's requests, when plan.workload names one: the simulator replays them (their mix,
    lengths and burstiness) at the rates it tries (`planc.plan_sim.plan_requests`)."""


@dataclass(frozen=True)
class GroupOption:
    """One way to lay out one replica of a group."""

    group: str
    pp: int
    tp: int
    batch: int
    stages: tuple[tuple[str, ...], ...]
    memory: tuple[float, ...]
    """Bytes per device, per stage."""
    tau: tuple[float, ...]
    """Device-seconds each request adds on each device of each stage: its prefill, and per output
    token what one more sequence adds to a decode step (the part of device time that grows with load)."""
    cap_rps: float
    """Requests/s one replica sustains at this batch, its sequences spending the whole chain's
    latency in it (the runtime steps a chain as one engine)."""
    tpot_s: float
    ttft_s: float
    copy_busy: tuple[float, ...] = ()
    """Per stage, the share of each of its devices a copy takes whatever its load: each decode step
    streams the stage's weights however few sequences it runs, about once per TPOT of the chain
    (empty: none). At `cap_rps` the two parts add up to the time of full-batch steps."""

    fixed_s: tuple[float, ...] = ()
    """Per stage, a one-sequence decode step: what every call of the stage costs whatever its size
    (the weights it streams; `planc.lane_model` reads it). Empty: not given."""

    @property
    def num_devices(self) -> int:
        return self.pp * self.tp

    def busy(self, stage: int) -> float:
        """`copy_busy` of one stage (0 when the option gives none)."""
        return self.copy_busy[stage] if self.copy_busy else 0.0


def chain_block_names(num_layers: int) -> list[str]:
    return ["embedding"] + [f"layer.{i}" for i in range(num_layers)] + ["head"]


def traffic_for(program: Program) -> Traffic:
    settings = program.spec.plan
    names = program.model_names()
    if settings.workload is None:
        return Traffic({n: 1 / len(names) for n in names}, settings.prompt_tokens, settings.output_tokens,
                       settings.rate)
    requests = load_workload(settings.workload).requests(names)
    counts = {n: 0 for n in names}
    for r in requests:
        counts[r.variant] += 1
    span = requests[-1].arrival_s - requests[0].arrival_s
    rate = settings.rate or ((len(requests) - 1) / span if span > 0 else None)
    return Traffic({n: c / len(requests) for n, c in counts.items()},
                   float(np.mean([r.prompt_tokens for r in requests])),
                   float(np.mean([r.output_tokens for r in requests])), rate, tuple(requests))


def plan_groups(program: Program) -> list[BlockGroup]:
    """Block groups from the compiled chains, or from the spec's descriptions when planning without weights."""
    arch = program.base.checkpoint.arch
    names = chain_block_names(arch.num_layers)
    instances: dict[str, list[str]] = {}
    lora: dict[str, LoraUse] = {}
    for name, entry in program.models.items():
        if program.chains is not None:
            chain = program.chains[name]
            instances[name] = chain.block_keys
            if chain.kind == "lora":
                lora[name] = _lora_from_adapter(program, name)
            continue
        declared = entry.declared
        if entry.kind == "adapter":
            instances[name] = [f"{program.spec.base.name}:{b}" for b in names]
            lora[name] = _declared_lora(entry)
        elif declared is None or declared.changes is None:
            # the base, or a variant whose weights were not read: assume every block is its own
            own = entry.kind != "base" and declared is not None
            instances[name] = [f"{name if own else program.spec.base.name}:{b}" for b in names]
        else:
            changed = parse_changes(declared.changes, arch.num_layers, f"{program.spec.source}: {entry.field}")
            instances[name] = [f"{name if b in changed else program.spec.base.name}:{b}" for b in names]
    return groups_from_instances(names, instances, lora)


def _lora_from_adapter(program: Program, variant: str) -> LoraUse:
    adapter = program.models[variant].adapter
    ranks = [m.rank for m in adapter.modules.values()]
    modules = tuple(sorted({k.rsplit(".", 1)[-1] for k in adapter.modules}))
    return LoraUse(variant, max(ranks) if ranks else 0, modules)


def _declared_lora(entry) -> LoraUse:
    decl = entry.declared
    if decl.lora is not None:
        return LoraUse(entry.name, decl.lora.r, tuple(decl.lora.target_modules))
    cfg_path = decl.adapter / "adapter_config.json"
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        targets = cfg.get("target_modules") or ["q_proj", "v_proj"]
        targets = [targets] if isinstance(targets, str) else targets
        return LoraUse(entry.name, int(cfg.get("r", 8)), tuple(t for t in targets if t in _LAYER_LINEARS))
    except (OSError, ValueError, TypeError):
        raise SpecError(f"{entry.field}: cannot read {cfg_path} (to plan without the adapter, "
                        "describe it with `lora: {r: 16, target_modules: [q_proj, v_proj]}`)") from None


def segment_sums(values: np.ndarray) -> np.ndarray:
    """(n+1, n+1): [a, b] is the sum of values[a:b] (meaningful for a < b)."""
    total = np.concatenate([[0.0], np.cumsum(values, dtype=float)])
    return total[None, :] - total[:, None]


def segment_max(values: np.ndarray) -> np.ndarray:
    """(n+1, n+1): [a, b] is the largest of values[a:b] (meaningful for a < b)."""
    n = len(values)
    out = np.zeros((n + 1, n + 1))
    for a in range(n):
        out[a, a + 1:] = np.maximum.accumulate(values[a:])
    return out


def min_max_split(cost: tuple[np.ndarray, np.ndarray], pp: int,
                  allowed: Optional[tuple[np.ndarray, np.ndarray]] = None) -> Optional[tuple[tuple[int, ...], float]]:
    """The contiguous split of n blocks into `pp` non-empty stages whose costliest stage costs least, and
    that cost: exact (dynamic programming over cut points, O(pp n^2)). `cost` = (any stage but the last,
    the last): (n+1, n+1) matrices, [a, b] the cost of a stage of blocks a..b-1 (a pipeline hop costs the
    stages that send one). `allowed`: the same shapes, which stages may exist at all (e.g. fit a device's
    memory). Returns (cut points 0 = c0 < c1 < ... < c_pp = n, the costliest stage's cost), or None when no
    split is allowed. Ties go to the earliest cuts."""
    n = cost[0].shape[0] - 1
    if pp > n:
        return None
    order = np.triu(np.ones((n + 1, n + 1), dtype=bool), 1)
    best = np.full(n + 1, np.inf)
    best[0] = 0.0
    choices = []
    for k in range(pp):
        last = k == pp - 1
        ok = order & allowed[last] if allowed is not None else order
        worst = np.where(ok, np.maximum(best[:, None], cost[last]), np.inf)
        arg = worst.argmin(axis=0)
        best = worst[arg, np.arange(n + 1)]
        choices.append(arg)
    if not np.isfinite(best[n]):
        return None
    cuts = [n]
    for arg in reversed(choices):
        cuts.append(int(arg[cuts[-1]]))
    return tuple(reversed(cuts)), float(best[n])


def gb(size: float) -> str:
    """Bytes as GB for a message: one decimal from 1 GB up, three significant digits below (a small device's
    figures would read 0 otherwise).

    >>> gb(72e9), gb(12.3e6)
    ('72.0', '0.0123')
    """
    return f"{size / 1e9:.1f}" if size >= 1e9 else f"{size / 1e9:.3g}"


def pareto(options: list[GroupOption]) -> list[GroupOption]:
    """Drop layouts that another beats or ties on every count: devices per replica, memory on its
    fullest device, capacity, TPOT and TTFT. The MIP has fewer choices and loses no optimum that
    depends only on these (a dropped layout's stages could still pack differently: a heuristic)."""
    def key(o: GroupOption) -> tuple:
        return (o.num_devices, max(o.memory), -o.cap_rps, o.tpot_s, o.ttft_s)

    kept = []
    for o in options:
        ko = key(o)
        if not any(other is not o and all(a <= b for a, b in zip(key(other), ko)) and key(other) != ko
                   for other in options):
            kept.append(o)
    return kept


class OptionBuilder:
    """Evaluates layouts of groups with the cost model (the planner's objective is a parameter:
    swap this object to change how options are costed)."""

    def __init__(self, costs: dict[str, BlockCost], cm: CostModel, cluster: Cluster, traffic: Traffic,
                 tpot_budget_s: float, ttft_budget_s: float, chain_length: int, lora_in_out: float,
                 arch: Optional[ArchConfig] = None):
        """`arch`: the architecture, to leave out TP degrees it cannot be split at (None: keep all)."""
        self.costs, self.cm, self.cluster, self.traffic = costs, cm, cluster, traffic
        self.arch = arch
        self.tpot_budget_s, self.ttft_budget_s, self.chain_length = tpot_budget_s, ttft_budget_s, chain_length
        self.lora_in_out = lora_in_out
        self._evaluated: dict[tuple, list[GroupOption]] = {}

    @classmethod
    def for_program(cls, program: Program, costs: dict[str, BlockCost], cluster: Cluster,
                    traffic: Traffic) -> "OptionBuilder":
        """The builder for a program's architecture and SLO on `cluster`."""
        arch, slo = program.base.checkpoint.arch, program.spec.plan.slo
        return cls(costs, CostModel.for_cluster(cluster, arch.dtype_bytes), cluster, traffic, slo.tpot_ms / 1e3,
                   slo.ttft_ms / 1e3, len(chain_block_names(arch.num_layers)), lora_in_out=2.0 * arch.hidden_size,
                   arch=arch)

    def options(self, group: BlockGroup) -> list[GroupOption]:
        """Every layout of one replica of `group` that meets the SLO and fits a device, less those another
        beats (`pareto`). Groups with the same blocks and adapters (the private tops of many fine-tunes)
        share one evaluation."""
        key = (group.blocks, tuple((u.rank, u.modules) for u in group.lora))
        if key not in self._evaluated:
            blocks = _GroupBlocks(self, group)
            every = [o for tp, pp in self._shapes() for o in self.layouts(group, tp, pp, blocks)]
            # Only unpipelined layouts prune unpipelined ones: engines run a pipelined copy below the
            # figures compared here, and the planner's unpipelined candidate needs them (`restricted`).
            kept = {id(o) for o in pareto(every) + pareto([o for o in every if o.pp == 1])}
            self._evaluated[key] = [o for o in every if id(o) in kept]
        return [replace(o, group=group.id) for o in self._evaluated[key]]

    def _shapes(self) -> list[tuple[int, int]]:
        """(TP, PP) of every layout inside one node, at the TP degrees that split the architecture (whole
        attention and KV heads per rank, `ArchConfig.tensor_parallel_misfit`)."""
        return [(tp, pp) for tp in self.cluster.tp_degrees() for pp in PIPELINE_DEPTHS
                if pp * tp <= self.cluster.devices_per_node and (self.arch is None or not self.arch.tensor_parallel_misfit(tp))]

    def no_layout(self, group: BlockGroup) -> str:
        """Why `options(group)` is empty, with the figures of the layout that came closest: memory first (one
        sequence, the widest layouts), then the TTFT, then the TPOT at a decode batch of one, each against
        the group's share of the SLO, and what would make it fit."""
        lo, share = self.traffic.output_tokens, group.num_positions / self.chain_length
        blocks = _GroupBlocks(self, group)
        rows = []  # (max memory per device, TTFT s, TPOT s, tp, pp) at batch 1, stages split for least memory
        for tp, pp in self._shapes():
            memory = blocks.memory(tp, pp, 1)
            found = min_max_split((memory, memory), pp)
            if found is None:
                continue
            cuts, fullest = found
            prefill = blocks.stage_sums(blocks.prefill(tp), blocks.hop_prefill, cuts)
            decode = blocks.stage_sums(blocks.decode(tp, 1), blocks.hop(1), cuts)
            rows.append((fullest, sum(prefill), sum(_loaded_steps(decode, prefill, 1, lo)), tp, pp))
        dev = self.cluster.device
        usable = dev.usable_bytes
        fits = [r for r in rows if r[0] <= usable]
        if not fits:
            memory, _, _, tp, pp = min(rows)
            return (f"one sequence needs {gb(memory)} GB per device even at TP {tp} x PP {pp} (the most one node "
                    f"of {self.cluster.devices_per_node} allows at TP degrees that split the model's heads); each "
                    f"{dev.name} holds {gb(usable)} GB usable: "
                    f"use devices with more memory, or more devices per node")
        ttft_budget = self.ttft_budget_s * share
        prompt = int(round(self.traffic.prompt_tokens))
        if all(r[1] > ttft_budget for r in fits):
            _, ttft, _, tp, pp = min(fits, key=lambda r: r[1])
            return (f"a {prompt}-token prefill takes at least {ttft * 1e3:.3g} ms there (TP {tp} x PP {pp}) against "
                    f"its share of plan.slo.ttft_ms ({ttft_budget * 1e3:.3g} of {self.ttft_budget_s * 1e3:g} ms): raise "
                    f"plan.slo.ttft_ms to at least {math.ceil(ttft / share * 1e3)}, shorten the prompts, or use faster devices")
        tpot_budget = self.tpot_budget_s * share
        _, _, tpot, tp, pp = min((r for r in fits if r[1] <= ttft_budget), key=lambda r: r[2])
        return (f"a decode step of one sequence takes at least {tpot * 1e3:.3g} ms there (TP {tp} x PP {pp}) against "
                f"its share of plan.slo.tpot_ms ({tpot_budget * 1e3:.3g} of {self.tpot_budget_s * 1e3:g} ms): raise "
                f"plan.slo.tpot_ms to at least {math.ceil(tpot / share * 1e3)}, or use faster devices")

    def layouts(self, group: BlockGroup, tp: int, pp: int, blocks: Optional["_GroupBlocks"] = None) -> list[GroupOption]:
        """The layouts of `group` at one (TP, PP), before `pareto`: the largest decode batch at which some
        split into stages fits a device and meets the SLO, cut where that batch gives the most capacity
        (least per-request device time on the busiest stage) and, of the cuts that give as much, where
        its fullest device holds least (`min_max_split`); and a quarter of that batch, cut alike."""
        if pp > group.num_positions:
            return []
        blocks = blocks or _GroupBlocks(self, group)
        share = group.num_positions / self.chain_length
        lp, lo = self.traffic.prompt_tokens, self.traffic.output_tokens
        usable = self.cluster.device.usable_bytes
        prefill = blocks.prefill(tp)
        feasible, cuts = [], ()  # (batch, decode time per block, memory per stage) at each feasible batch
        for batch in _BATCHES:
            decode = blocks.decode(tp, batch)
            per_request = segment_sums(decode / batch * lo + prefill)
            hop = blocks.hop(batch) / batch * lo + blocks.hop_prefill
            time = (per_request + hop[None, :], per_request)  # (a stage that sends a hop, the last stage)
            memory = blocks.memory(tp, pp, batch)
            fits = memory <= usable
            fastest = min_max_split(time, pp, (fits, fits))
            if fastest is None:
                break
            # TTFT, TPOT and the time a request spends in the copy do not depend on where the stages are cut
            # (every block sends the same hidden size to the next)
            stage_prefill = blocks.stage_sums(prefill, blocks.hop_prefill, fastest[0])
            if sum(stage_prefill) > self.ttft_budget_s * share:
                return []
            stage_decode = blocks.stage_sums(decode, blocks.hop(batch), fastest[0])
            tpot = sum(_loaded_steps(stage_decode, stage_prefill, batch, lo))
            if tpot > self.tpot_budget_s * share:
                break
            # Capacity is min(1 / the busiest stage's time per request, pp * batch / that time): every split
            # whose busiest stage stays within both limits gives the same; of those, the least memory.
            residence = (sum(stage_prefill) + lo * tpot) / share
            limit = max(fastest[1], residence / (pp * batch)) * (1 + 1e-9)
            cuts, _ = min_max_split((memory, memory), pp, (fits & (time[0] <= limit), fits & (time[1] <= limit)))
            feasible.append((batch, decode, memory))
        # the largest SLO-feasible batch, and a quarter of it for when memory is tight; both cut where the
        # largest batch is best cut (a copy at a smaller batch holds less on every stage, so it fits too):
        # one set of cuts per group, depth and degree, which the engine's stages follow
        chosen = feasible[-1:] + ([feasible[-3]] if len(feasible) >= 3 else [])
        out = []
        stages = tuple(tuple(group.blocks[a:b]) for a, b in zip(cuts, cuts[1:]))
        single = blocks.stage_sums(blocks.decode(tp, 1), blocks.hop(1), cuts)
        prefill = blocks.stage_sums(prefill, blocks.hop_prefill, cuts)
        for batch, decode_blocks, memory_matrix in chosen:
            decode = blocks.stage_sums(decode_blocks, blocks.hop(batch), cuts)
            memory = tuple(float(memory_matrix[a, b]) for a, b in zip(cuts, cuts[1:]))
            full = [d / batch * lo + p for d, p in zip(decode, prefill)]
            tpot = sum(_loaded_steps(decode, prefill, batch, lo))
            # A request stays for the whole chain's latency, which the group's part of it is `share` of.
            e2e = (sum(prefill) + lo * tpot) / share
            cap = min(1.0 / max(full), pp * batch / e2e)
            if batch > 1:
                # decode step time ~ fixed (weights) + per sequence: the fixed part is paid per copy
                slope = [max(d - s, 0.0) / (batch - 1) for d, s in zip(decode, single)]
                tau = tuple(p + lo * k for p, k in zip(prefill, slope))
                busy = tuple(max(f - t, 0.0) * cap for f, t in zip(full, tau))
            else:
                tau, busy = tuple(full), ()
            out.append(GroupOption(group.id, pp, tp, batch, stages, memory, tau, cap,
                                   tpot_s=tpot, ttft_s=sum(prefill), copy_busy=busy, fixed_s=tuple(single)))
        return out


class _GroupBlocks:
    """One group's blocks as the option builder costs them: per-block times on the target (cached per
    TP and batch) and the per-stage memory of any contiguous range of them."""

    def __init__(self, builder: OptionBuilder, group: BlockGroup):
        self.builder, self.costs = builder, [builder.costs[b] for b in group.blocks]
        cm, traffic = builder.cm, builder.traffic
        self.prompt = int(round(traffic.prompt_tokens))
        self._times: dict[tuple, np.ndarray] = {}
        adapter = sum(u.rank * builder.lora_in_out * len(u.modules) * cm.dtype_bytes for u in group.lora)
        self.weights = segment_sums(np.array([c.weight_bytes + (adapter if b.startswith("layer.") else 0.0)
                                              for b, c in zip(group.blocks, self.costs)]))
        self.kv = segment_sums(np.array([c.kv_bytes_per_token for c in self.costs]))
        self.act = segment_max(np.array([c.act_bytes_per_token for c in self.costs]))
        self.hop_prefill = self.hop(self.prompt)

    def prefill(self, tp: int) -> np.ndarray:
        """Per block, one prompt's prefill; the head computes logits for the prompt's last token only (as
        the runtime and the simulator do), not for every prompt token."""
        if ("prefill", tp) not in self._times:
            cm = self.builder.cm
            self._times[("prefill", tp)] = np.array([
                cm.block_time(c, tp, decode_seqs=1) if c.kind == "head" else cm.block_time(c, tp, prefill_tokens=self.prompt)
                for c in self.costs])
        return self._times[("prefill", tp)]

    def decode(self, tp: int, batch: int) -> np.ndarray:
        """Per block, a decode step of `batch` sequences at the mean context."""
        if ("decode", tp, batch) not in self._times:
            traffic, cm = self.builder.traffic, self.builder.cm
            ctx = batch * (traffic.prompt_tokens + traffic.output_tokens / 2)
            self._times[("decode", tp, batch)] = np.array([
                cm.block_time(c, tp, decode_seqs=batch, context_tokens=ctx) for c in self.costs])
        return self._times[("decode", tp, batch)]

    def hop(self, tokens: int) -> np.ndarray:
        """(n+1,): [b] is the pipeline hop of `tokens` activations that a stage ending at block b-1 sends."""
        return np.array([0.0] + [self.builder.cm.transfer_time(tokens, c.hidden_size) for c in self.costs])

    def memory(self, tp: int, pp: int, batch: int) -> np.ndarray:
        """(n+1, n+1): [a, b] the bytes per device of a stage of blocks a..b-1: weights and adapters, the KV
        of the `pp` batches a pipelined copy holds, and the largest block's activations for a step."""
        traffic = self.builder.traffic
        lp, lo = traffic.prompt_tokens, traffic.output_tokens
        kv = pp * batch * (lp + lo) * self.kv
        act = max(lp, step_tokens(batch, lp, lo)) * self.act
        return (self.weights + kv + act) / tp

    @staticmethod
    def stage_sums(values: np.ndarray, hop: np.ndarray, cuts: tuple[int, ...]) -> list[float]:
        """Per stage of the split at `cuts`, the sum of `values` over its blocks, plus the hop it sends (all
        but the last)."""
        last = len(cuts) - 2
        return [float(values[a:b].sum()) + (float(hop[b]) if i < last else 0.0)
                for i, (a, b) in enumerate(zip(cuts, cuts[1:]))]


def _loaded_steps(decode: list[float], prefill: list[float], batch: int, output_tokens: float) -> list[float]:
    """Per stage, a decode step's time when the copy holds `batch` sequences at its capacity: the engine
    puts decodes and prompt chunks in one step (chunked prefill), so in steady state each step also
    carries the prompts of the sequences that replace those finishing, batch / output_tokens
    requests' prefill per step, and every decode in it waits for them."""
    return [d + batch * p / output_tokens for d, p in zip(decode, prefill)]


class CostPass(Pass):
    """Options per block group on the plan's cluster (ctx option `cluster` overrides plan.cluster)."""

    name = "cost"
    provides = ("groups", "plan_options")

    def run(self, program: Program, ctx: PassContext) -> bool:
        settings = program.spec.plan
        ref = ctx.options_for(self.name).get("cluster") or settings.cluster
        if ref is None:
            raise SpecError(f"{program.spec.source}: no cluster to plan for: give --cluster or `plan: {{cluster: ...}}`")
        cluster = ref if isinstance(ref, Cluster) else load_cluster(_relative(program, ref))
        arch = program.base.checkpoint.arch
        costs = arch_block_costs(arch, arch.dtype_bytes)
        traffic = traffic_for(program)
        builder = OptionBuilder.for_program(program, costs, cluster, traffic)
        program.groups = plan_groups(program)
        program.plan_options = {g.id: builder.options(g) for g in program.groups}
        no_layout = {g.id: builder.no_layout(g) for g in program.groups if not program.plan_options[g.id]}
        program.extras["plan_inputs"] = {"cluster": cluster, "traffic": traffic, "costs": costs, "no_layout": no_layout}
        return True


def _relative(program: Program, ref: str) -> str:
    path = program.spec.root / ref
    return str(path) if path.suffix in (".yaml", ".yml") and path.is_file() else ref
