"""How the ray backend lays a bundle out on a Ray cluster: which stage actors, with what resources.

The engine's stages are ranges of chain positions (the plan's `stage_ranges`, or an even split when
the bundle has no plan). On Ray each stage is served by actors: one per plan group that runs
through it (holding only that group's variants' blocks, as the plan placed them), with as many
copies as the plan gave the group replicas and, per copy, the share of a device its placement has.
Without a plan every stage is one actor holding every variant's blocks at its positions. A plan over
several nodes gets one engine per node (`RayLayout.engines`), each with the stages of its node's part
of the plan (`Plan.for_node`) and actors over its node's copies only (`ActorSpec.engine`).

>>> layout = layout_for(["base", "legal"], chain_length=6, plan=None, device_kind=None)
>>> [(a.name, a.positions, a.copies, a.num_cpus) for a in layout.actors]
[('stage0', (0, 3), 1, 0.25), ('stage1', (3, 6), 1, 0.25)]
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from planc.plan import Plan, StagePlacement

DEFAULT_NUM_STAGES = 2
"""Stages of a bundle compiled without a plan: enough to exercise the chain across processes."""
CPU_SHARE = 0.25
"""Ray CPUs of an actor (stage copy or ingress) when no plan says otherwise: a small machine runs them all."""
MAX_ONGOING_REQUESTS = 1024
"""Requests the ingress takes at once; the engine queues and batches them (Serve's default of 5 would not)."""


@dataclass(frozen=True)
class ActorSpec:
    """The actors serving one plan group (or every variant) over one engine stage."""

    name: str
    stage: int
    positions: tuple[int, int]
    """[start, stop) chain positions."""
    variants: tuple[str, ...]
    """Whose blocks it loads; a sequence of another variant never reaches it."""
    copies: int
    num_cpus: float
    num_gpus: float
    nodes: tuple[int, ...] = ()
    """The plan's node of each copy (empty without a plan)."""
    group: Optional[str] = None
    """The plan's block group it serves (None without a plan)."""
    engine: Optional[int] = None
    """The node whose engine calls it, on a plan with one engine per node (`stage` is that engine's)."""
    tp: tuple[int, ...] = ()
    """The plan's tensor-parallel degree of each copy (empty: 1 each). A copy of degree t runs as t actors
    (its ranks), each with `num_cpus` and `num_gpus`."""

    def ranks(self, copy: int) -> int:
        return self.tp[copy] if self.tp else 1

    @property
    def num_actors(self) -> int:
        """Actors of all copies: one per rank."""
        return sum(self.ranks(c) for c in range(self.copies))

    def labels(self, copy: int) -> list[str]:
        """The actors of one copy, rank 0 first: `name.c`, then `name.c.r1`, ... for a tensor-parallel copy."""
        return [f"{self.name}.{copy}"] + [f"{self.name}.{copy}.r{k}" for k in range(1, self.ranks(copy))]


@dataclass(frozen=True)
class EngineSpec:
    """One node's engine, on a plan with one engine per node: its stages, as ranges of chain positions."""

    node: int
    stages: list[tuple[int, int]]


@dataclass
class RayLayout:
    device: str
    """`cpu` or `gpu`: what each actor's share is a share of."""
    stages: list[tuple[int, int]]
    actors: list[ActorSpec]
    ingress_num_cpus: float = CPU_SHARE
    nodes: int = 1
    """Worker nodes the plan uses."""
    devices_per_node: int = 0
    """GPUs each worker node needs (0 on CPU clusters)."""
    cluster: Optional[str] = None
    notes: list[str] = field(default_factory=list)
    engines: list[EngineSpec] = field(default_factory=list)
    """One engine per node (the plan's `engine_plans`), each over its node's actors; empty: one engine
    over `stages` and every actor."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "RayLayout":
        data = dict(data)
        data["stages"] = [tuple(s) for s in data["stages"]]
        data["actors"] = [ActorSpec(**{**a, "positions": tuple(a["positions"]), "variants": tuple(a["variants"]),
                                       "nodes": tuple(a["nodes"]), "tp": tuple(a.get("tp", ()))})
                          for a in data["actors"]]
        data["engines"] = [EngineSpec(e["node"], [tuple(s) for s in e["stages"]]) for e in data.get("engines", [])]
        return cls(**data)

    def actors_of(self, stage: int, engine: Optional[int] = None) -> list[ActorSpec]:
        """The actors of one engine stage (of node `engine`'s engine, on a plan with one per node)."""
        return [a for a in self.actors if a.stage == stage and a.engine == engine]

    def gpus_per_node(self) -> dict[int, float]:
        """GPU demand of the stage copies on each node (what a worker group must offer)."""
        demand: Counter = Counter()
        for a in self.actors:
            for c, node in enumerate(a.nodes or (0,) * a.copies):
                demand[node] += a.num_gpus * a.ranks(c)
        return dict(demand)


def layout_for(variants: list[str], chain_length: int, plan: Optional[Plan], device_kind: Optional[str],
               devices_per_node: int = 0) -> RayLayout:
    """The actors for a bundle: from its plan when it has one (`device_kind` of the plan's cluster)."""
    if plan is None:
        from planc.runtime.stage import split_positions  # the runtime's own split; not loaded by `import planc`

        ranges = split_positions(chain_length, min(DEFAULT_NUM_STAGES, chain_length))
        actors = [ActorSpec(f"stage{i}", i, (r.start, r.stop), tuple(variants), 1, CPU_SHARE, 0.0)
                  for i, r in enumerate(ranges)]
        return RayLayout("cpu", [(r.start, r.stop) for r in ranges], actors,
                         notes=["no plan: an even split into stages, one copy each (compile with --cluster to plan)"])
    shares = _device_shares(plan)
    gpu = device_kind == "gpu"
    actors, engines = [], []
    parts = plan.engine_plans()
    for node, part in parts:
        ranges = part.stage_ranges(chain_length)
        prefix = "" if node is None else f"n{node}-"
        if node is not None:
            engines.append(EngineSpec(node, [(r.start, r.stop) for r in ranges]))
        for i, (r, groups) in enumerate(part.stage_groups(chain_length)):
            for g in groups:
                copies = part.copies(g["id"])
                names = {_block_name(p, chain_length) for p in r}
                rank_shares, nodes, tps = [], [], []
                for copy in copies:
                    hit = [p for p in copy if names & set(p.blocks)] or copy[:1]
                    # a tensor-parallel copy runs as one actor per rank, each with its share of one device
                    rank_shares.append(max(shares[_key(p)] / p.tp / _stages_in(p, ranges, chain_length) for p in hit))
                    nodes.append(hit[0].node)
                    tps.append(hit[0].tp)
                # One amount for every rank: the smallest, so that copies the plan packs onto one device fit there.
                amount = _ray_amount(min(rank_shares))
                actors.append(ActorSpec(f"{prefix}stage{i}-{g['id']}", i, (r.start, r.stop), tuple(g["users"]),
                                        len(copies), amount if not gpu else CPU_SHARE, amount if gpu else 0.0,
                                        tuple(nodes), g["id"], node, tuple(tps) if any(t > 1 for t in tps) else ()))
    nodes_used = len({p.node for p in plan.placements}) or 1
    stages = [(r.start, r.stop) for r in plan.stage_ranges(chain_length)] if not engines else []
    return RayLayout("gpu" if gpu else "cpu", stages, actors, nodes=nodes_used,
                     devices_per_node=devices_per_node if gpu else 0, cluster=plan.cluster, engines=engines)


def _key(p: StagePlacement) -> tuple:
    return (p.group, p.node, p.replica, p.stage, p.devices, p.tp, p.batch)


def _device_shares(plan: Plan) -> dict[tuple, float]:
    """Per placement (by `_key`): its devices' share, when the plan packs several placements on one device."""
    per_device = Counter((p.node, d) for p in plan.placements for d in p.devices)
    return {_key(p): p.tp / max(per_device[(p.node, d)] for d in p.devices) for p in plan.placements}


def _stages_in(p: StagePlacement, ranges: list[range], chain_length: int) -> int:
    """Engine stages that fall inside one placement (its share is split among their actors)."""
    names = set(p.blocks)
    return sum(1 for r in ranges if names & {_block_name(q, chain_length) for q in r}) or 1


def _block_name(position: int, chain_length: int) -> str:
    if position == 0:
        return "embedding"
    return "head" if position == chain_length - 1 else f"layer.{position - 1}"


def _ray_amount(share: float) -> float:
    """Ray takes fractions of one unit (to 1e-4) or whole units: round a fraction down, a larger share up."""
    if share >= 1:
        return float(math.ceil(share - 1e-9))
    return max(math.floor(share * 1e4) / 1e4, 1e-4)
