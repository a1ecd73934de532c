"""The plan IR: block groups, and the deployment the planner chose for them.

A *block group* is a run of consecutive chain positions that the same set of variants runs through
the same block instances: the shared trunk of a family of partial fine-tunes is one group, each
fine-tune's private top layers another. Groups are what the planner lays out; a group's *stage* is
a contiguous slice of it (pipeline parallelism) on `tp` devices of one node (tensor parallelism),
and a group may have several *replicas* (data parallelism) for the combined load of its users.

>>> from planc.plan import groups_from_instances
>>> gs = groups_from_instances(["embedding", "layer.0", "layer.1", "head"],
...     {"base": ["e", "l0", "l1", "h"], "legal": ["e", "l0", "x1", "xh"], "chat": ["e", "l0", "l1", "h"]})
>>> [(g.id, g.blocks, g.users) for g in gs]
[('g0', ('embedding', 'layer.0'), ('base', 'legal', 'chat')), ('g1', ('layer.1', 'head'), ('base', 'chat')), ('g2', ('layer.1', 'head'), ('legal',))]
"""
from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from planc.errors import SpecError


@dataclass(frozen=True)
class LoraUse:
    """A LoRA variant riding on a group's base blocks."""

    variant: str
    rank: int
    modules: tuple[str, ...]
    """Linear names inside a decoder layer (q_proj, ...)."""


@dataclass(frozen=True)
class BlockGroup:
    id: str
    blocks: tuple[str, ...]
    """Block names in chain order (``layer.3``)."""
    first_position: int
    instance_keys: tuple[str, ...]
    """The block instance at each position (zoo key, or a label when planning without weights)."""
    users: tuple[str, ...]
    """Variants whose chains run through this group."""
    predecessors: tuple[str, ...] = ()
    """Groups that feed this one (the previous segment's groups sharing a user)."""
    lora: tuple[LoraUse, ...] = ()

    @property
    def num_positions(self) -> int:
        return len(self.blocks)


def groups_from_instances(block_names: list[str], instances: dict[str, list[str]],
                          lora: Optional[dict[str, LoraUse]] = None) -> list[BlockGroup]:
    """Split chains into block groups: cut wherever the partition of variants by instance changes."""
    variants = list(instances)
    lora = lora or {}

    def partition(pos: int) -> tuple[tuple[str, ...], ...]:
        by_key: dict[str, list[str]] = {}
        for v in variants:
            by_key.setdefault(instances[v][pos], []).append(v)
        return tuple(tuple(vs) for vs in by_key.values())

    segments: list[tuple[int, int]] = []
    start = 0
    for pos in range(1, len(block_names) + 1):
        if pos == len(block_names) or partition(pos) != partition(start):
            segments.append((start, pos))
            start = pos
    groups: list[BlockGroup] = []
    previous: list[BlockGroup] = []
    for lo, hi in segments:
        current = []
        for users in partition(lo):
            preds = tuple(g.id for g in previous if set(g.users) & set(users))
            current.append(BlockGroup(
                id=f"g{len(groups) + len(current)}", blocks=tuple(block_names[lo:hi]), first_position=lo,
                instance_keys=tuple(instances[users[0]][lo:hi]), users=users, predecessors=preds,
                lora=tuple(lora[v] for v in users if v in lora)))
        groups.extend(current)
        previous = current
    return groups


_RANGE = re.compile(r"^layers?\.(\d+)(?:-(\d+))?$")


def parse_changes(changes: list[str], num_layers: int, where: str) -> set[str]:
    """`embedding`, `head`, `layer.N`, `layers.A-B` (inclusive) -> block names."""
    out: set[str] = set()
    for item in changes:
        item = item.strip()
        if item in ("embedding", "head"):
            out.add(item)
            continue
        m = _RANGE.match(item)
        if not m:
            raise SpecError(f"{where}: {item!r} is not a block (embedding, head, layer.N or layers.A-B)")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if not lo <= hi < num_layers:
            raise SpecError(f"{where}: {item!r} is outside layers 0-{num_layers - 1}")
        out.update(f"layer.{i}" for i in range(lo, hi + 1))
    return out


STEP_HEADROOM = 1.25
"""A step's token budget over what it carries on average at capacity: arrivals come in bursts."""


def step_tokens(batch: int, prompt_tokens: float, output_tokens: float) -> int:
    """Tokens a copy's step carries when it holds `batch` sequences at its capacity, with headroom:
    one per decode, and the prompts of the batch / output_tokens sequences that replace those
    finishing each step (chunked prefill puts both in one step).

    >>> step_tokens(512, 512, 128)  # 512 decodes + 4 x 512 prompt tokens, x 1.25
    3200
    """
    return int(round(batch * (1 + prompt_tokens / output_tokens) * STEP_HEADROOM))


@dataclass
class StagePlacement:
    """One copy of one pipeline stage of a group, on `tp` devices of one node."""

    group: str
    replica: int
    stage: int
    blocks: tuple[str, ...]
    devices: tuple[int, ...]
    node: int
    tp: int
    batch: int
    """Decode batch the stage runs at (the SLO's largest)."""
    memory_gb: float
    """Per device: weights/tp + KV + activations."""
    load_rps: float
    """Requests per second the solution routes through this copy."""


@dataclass
class Plan:
    cluster: str
    objective: str
    groups: list[dict[str, Any]]
    """Per group: id, blocks, users, pp, tp, batch, replicas, load share."""
    placements: list[StagePlacement]
    predicted: dict[str, Any]
    """throughput_rps, tpot_ms and ttft_ms per variant, devices used, memory per device."""
    solver: dict[str, Any]
    """name, status, objective, bound, gap, seconds, seed, time_limit_s."""
    settings: dict[str, Any] = field(default_factory=dict)
    routes: dict[str, dict[str, float]] = field(default_factory=dict)
    """Variant -> node (as a string) -> the part of its traffic that node's engine serves. On several
    nodes each node runs its own engine over its own copies (`engine_plans`); empty in plans made before
    that: one engine over every node."""

    def to_json(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Plan":
        data = dict(data)
        data["placements"] = [StagePlacement(**{**p, "blocks": tuple(p["blocks"]), "devices": tuple(p["devices"])})
                              for p in data["placements"]]
        return cls(**data)

    def devices_used(self) -> list[int]:
        return sorted({d for p in self.placements for d in p.devices})

    def block_batch_caps(self) -> dict[str, int]:
        """Block instance key -> largest decode batch the plan runs it at (the runtime's per-block cap)."""
        caps: dict[str, int] = {}
        for g in self.groups:
            batch = max((lay["batch"] for lay in g["layouts"]), default=0)
            for key in g["instance_keys"]:
                caps[key] = max(caps.get(key, 0), batch)
        return caps

    def copies(self, group: str) -> list[list[StagePlacement]]:
        """A group's copies, each its pipeline stages in order. Placements come layout by layout, copy
        by copy, stage by stage (`passes.parallelize.to_plan`; replica numbers restart per layout), so
        a copy starts at each stage 0."""
        out: list[list[StagePlacement]] = []
        for p in self.placements:
            if p.group == group:
                if p.stage == 0 or not out:
                    out.append([])
                out[-1].append(p)
        return out

    def stage_groups(self, chain_length: int) -> list[tuple[range, list[dict[str, Any]]]]:
        """Each of `stage_ranges` with the groups that serve it: the stages are cut at every group
        boundary, so a group covers a stage whole or misses it."""
        return [(r, [g for g in self.groups
                     if g["first_position"] <= r.start and r.stop <= g["first_position"] + g["num_blocks"]])
                for r in self.stage_ranges(chain_length)]

    def engine_limits(self, chain_length: int, tokens_per_copy: int) -> tuple[int, int]:
        """(max_running, max_batch_tokens) of the engine that drives the plan's deployment (on several nodes: of
        `for_node`'s plan, one engine per node).

        Sequences: as many as the stage with the least room holds (what the copies serving it hold,
        summed: a copy with pipeline depth pp holds pp lanes of its layout's decode batch, as the
        planner sized its KV). Tokens per step: per copy of a stage, what its steps carry at the
        planned load (`step_tokens` of the sequences it holds: their decodes and the prompts replacing
        those that finish, with headroom) and at least `tokens_per_copy`, summed over the stage's
        copies, since they run their calls side by side; the stage with the smallest sum sets it. A
        budget below that admits prompts more slowly than they arrive at the plan's throughput.
        """
        prompt, output = self.settings.get("prompt_tokens"), self.settings.get("output_tokens")
        room, tokens = [], []
        for _, groups in self.stage_groups(chain_length):
            held = [len(copy) * copy[0].batch for g in groups for copy in self.copies(g["id"])]
            room.append(sum(held))
            tokens.append(sum(max(tokens_per_copy, step_tokens(n, prompt, output) if prompt and output else 0)
                              for n in held))
        return max(1, min(room, default=1)), max(tokens_per_copy, min(tokens, default=1))

    def engine_plans(self) -> list[tuple[Optional[int], "Plan"]]:
        """The engines that run the plan, each with the part of the plan it runs: (node, its plan) per
        node on several nodes with routes; (None, the whole plan) otherwise."""
        nodes = sorted({p.node for p in self.placements})
        if len(nodes) <= 1 or not self.routes:
            return [(None, self)]
        return [(k, self.for_node(k)) for k in nodes]

    def node_traffic(self, node: int) -> dict[str, float]:
        """Variant -> its share of all traffic that node `node`'s engine serves."""
        shares = self.settings.get("shares") or {}
        out = {v: shares.get(v, 0.0) * r.get(str(node), 0.0) for v, r in self.routes.items()}
        return {v: x for v, x in out.items() if x > 0}

    def for_node(self, node: int) -> "Plan":
        """What node `node`'s engine runs: the copies on that node, its groups with the layouts they have
        there, and the traffic routed to it (shares renormalised, its part of the rate and throughput).

        >>> p = StagePlacement
        >>> plan = Plan("c", "throughput", [{"id": "g0", "users": ["a", "b"], "share": 1.0, "layouts": [
        ...     {"pp": 1, "tp": 1, "batch": 8, "replicas": 2}]}],
        ...     [p("g0", 0, 0, ("layer.0",), (0,), 0, 1, 8, 1.0, 3.0),
        ...      p("g0", 1, 0, ("layer.0",), (1,), 1, 1, 8, 1.0, 1.0)],
        ...     {"throughput_rps": 4.0}, {}, {"shares": {"a": 0.5, "b": 0.5}, "rate": 4.0, "lanes_per_node": {"1": 1}},
        ...     routes={"a": {"0": 1.0}, "b": {"0": 0.5, "1": 0.5}})
        >>> one = plan.for_node(1)
        >>> one.settings["shares"], one.settings["rate"], one.settings["lanes"], one.groups[0]["layouts"][0]["replicas"]
        ({'b': 1.0}, 1.0, 1, 1)
        """
        traffic = self.node_traffic(node)
        total = sum(traffic.values())
        placements = [p for p in self.placements if p.node == node]
        groups = []
        for g in self.groups:
            copies = Counter((len(c), c[0].tp, c[0].batch) for c in self.copies(g["id"]) if c[0].node == node)
            if not copies:
                continue
            layouts = [{**lay, "replicas": copies[(lay["pp"], lay["tp"], lay["batch"])]} for lay in g["layouts"]
                       if copies[(lay["pp"], lay["tp"], lay["batch"])]]
            share = sum(traffic.get(v, 0.0) for v in g["users"]) / total if total else 0.0
            groups.append({**g, "layouts": layouts, "share": share})
        settings = dict(self.settings)
        settings["shares"] = {v: x / total for v, x in traffic.items()} if total else {}
        if settings.get("rate"):
            settings["rate"] = settings["rate"] * total
        lanes = (self.settings.get("lanes_per_node") or {}).get(str(node))
        if lanes:
            settings["lanes"] = lanes
        predicted = {**self.predicted, "throughput_rps": self.predicted.get("throughput_rps", 0.0) * total,
                     "variants": {v: x for v, x in (self.predicted.get("variants") or {}).items() if v in traffic}}
        engine = (self.predicted.get("engines") or {}).get(str(node))
        if engine:
            predicted["engine_capacity_rps"] = engine["engine_capacity_rps"]
        return Plan(self.cluster, self.objective, groups, placements, predicted, dict(self.solver), settings,
                    {v: {str(node): 1.0} for v in traffic})

    def stage_ranges(self, chain_length: int) -> list[range]:
        """Chain positions cut where groups end and wherever a layout of a group that has copies cuts its
        pipeline: the stages an in-process runtime builds (a distributed backend places each on its
        devices). Every copy's pipeline stages are then whole engine stages or runs of them, so each copy
        runs the blocks the plan put on its devices (a group whose layouts cut differently gets the cuts
        of all of them)."""
        cuts = {0, chain_length}
        for g in self.groups:
            cuts.add(g["first_position"])
            cuts.add(g["first_position"] + g["num_blocks"])
            for lay in g["layouts"]:
                if not lay.get("replicas", 1):
                    continue
                position = g["first_position"]
                for n in lay.get("stage_blocks", [])[:-1]:
                    position += n
                    cuts.add(position)
        bounds = sorted(c for c in cuts if 0 <= c <= chain_length)
        return [range(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]
