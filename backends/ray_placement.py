"""Where the ray backend's stage actors run: every plan node's actors on one Ray node.

The planner keeps a node's stage copies together: tensor-parallel devices and pipeline hops inside a
node use its fast links, and on a plan over several nodes each node's engine calls only its own
copies (`RayLayout.engines`). Ray's scheduler knows none of that and spreads actors over whatever
nodes have room. So the ingress reserves one placement group per plan node before it starts a
stage: STRICT_PACK, one bundle per stage-actor copy with that copy's CPUs and GPUs. Ray puts each
group whole on one node. Two plan nodes may share a Ray node with room for both (a private cluster
on one machine runs a whole plan that way); one plan node never spans two. The groups belong to the
ingress replica that reserves them and go with it, as its actors do.

>>> from planc.backends.ray_layout import ActorSpec, RayLayout
>>> layout = RayLayout("gpu", [], [ActorSpec("n0-stage0-g0", 0, (0, 9), ("a",), 2, 0.25, 4.0, (0, 0), "g0", 0),
...                                ActorSpec("n1-stage0-g0", 0, (0, 9), ("a",), 1, 0.25, 8.0, (1,), "g0", 1)])
>>> node_bundles(layout)[1]
[('n1-stage0-g0.0', {'CPU': 0.25, 'GPU': 8.0})]
>>> unplaceable(layout, [{"Alive": True, "Resources": {"CPU": 64.0, "GPU": 4.0}}])
"plan node 0's stage actors need 0.5 CPU and 8 GPU on one Ray node; the cluster's 1 node has (CPU, GPU): (64, 4)"
"""
from __future__ import annotations

from typing import Any, Optional

from planc.backends.ray_layout import RayLayout

SLACK = 1e-6
"""Sums of rounded-down fractional amounts: 3 x 0.3333 fits a node of 1 CPU."""
SHOWN_NODES = 8
"""How many Ray nodes a message lists."""


def node_bundles(layout: RayLayout) -> dict[int, list[tuple[str, dict[str, float]]]]:
    """Per plan node, its stage-actor copies in a fixed order: (the copy's label, its Ray resources).
    Empty for a layout without a plan (its actors have no node and go where Ray puts them)."""
    out: dict[int, list[tuple[str, dict[str, float]]]] = {}
    for a in layout.actors:
        resources = {"CPU": a.num_cpus, **({"GPU": a.num_gpus} if a.num_gpus else {})}
        for c, node in enumerate(a.nodes):
            out.setdefault(node, []).extend((label, resources) for label in a.labels(c))  # a bundle per rank
    return dict(sorted(out.items()))


def unplaceable(layout: RayLayout, ray_nodes: list[dict[str, Any]]) -> Optional[str]:
    """One line on the first plan node that no alive Ray node could hold even when idle (`ray.nodes()`'s
    entries), or None when each fits on one."""
    alive = [n.get("Resources", {}) for n in ray_nodes if n.get("Alive")]
    for node, items in node_bundles(layout).items():
        need = _total(items)
        if any(all(r.get(k, 0.0) + SLACK >= v for k, v in need.items()) for r in alive):
            continue
        offer = ", ".join(f"({r.get('CPU', 0):g}, {r.get('GPU', 0):g})" for r in alive[:SHOWN_NODES])
        more = f" and {len(alive) - SHOWN_NODES} more" if len(alive) > SHOWN_NODES else ""
        return (f"plan node {node}'s stage actors need {_describe(need)} on one Ray node; the cluster's "
                f"{len(alive)} node{'s' if len(alive) != 1 else ''} {'have' if len(alive) != 1 else 'has'} "
                f"(CPU, GPU): {offer or 'none alive'}{more}")
    return None


def reserve(layout: RayLayout, prefix: str, timeout_s: float) -> dict[str, Any]:
    """Reserve one STRICT_PACK placement group per plan node and wait until Ray has placed them all;
    returns each copy's scheduling strategy by its label (empty without a plan). Raises `StageFailed`
    naming the plan node that found no room within `timeout_s`, after giving back what it reserved."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from planc.runtime.stage import StageFailed

    bundles = node_bundles(layout)
    if not bundles:
        return {}
    groups = {node: placement_group([r for _, r in items], strategy="STRICT_PACK", name=f"{prefix}node{node}")
              for node, items in bundles.items()}
    ready = {node: g.ready() for node, g in groups.items()}
    _, pending = ray.wait(list(ready.values()), num_returns=len(ready), timeout=timeout_s)
    if pending:
        stuck = next(node for node, ref in ready.items() if ref in pending)
        for g in groups.values():
            remove_placement_group(g)
        raise StageFailed(f"plan node {stuck}'s stage actors ({_describe(_total(bundles[stuck]))}) found no Ray "
                          f"node with that much free within {timeout_s:.0f} s (free in the cluster: "
                          f"{ray.available_resources()})")
    return {label: PlacementGroupSchedulingStrategy(groups[node], placement_group_bundle_index=i)
            for node, items in bundles.items() for i, (label, _) in enumerate(items)}


def placed_nodes(prefix: str) -> dict[int, str]:
    """Plan node -> the Ray node id its group was placed on, for the groups named with `prefix` (what an
    ingress reserved); read from Ray's placement group table by any driver of the cluster."""
    from ray.util.placement_group import placement_group_table

    out = {}
    for entry in placement_group_table().values():
        name = entry.get("name", "")
        if name.startswith(prefix) and entry.get("state") == "CREATED" and entry.get("bundles_to_node_id"):
            out[int(name.rsplit("node", 1)[1])] = next(iter(entry["bundles_to_node_id"].values()))
    return dict(sorted(out.items()))


def _total(items: list[tuple[str, dict[str, float]]]) -> dict[str, float]:
    total: dict[str, float] = {}
    for _, resources in items:
        for k, v in resources.items():
            total[k] = total.get(k, 0.0) + v
    return total


def _describe(need: dict[str, float]) -> str:
    return " and ".join(f"{round(v, 4):g} {k}" for k, v in need.items())
