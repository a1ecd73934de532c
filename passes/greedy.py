"""A greedy packer over the same options as the MIP: the planner's baseline and its warm start.

Groups are placed in chain order (trunks before the tops that follow them), each with the
option that needs the fewest devices and, among those, serves the most; stages go worst-fit
(the device with the most free memory) on a node that hosts the groups feeding it. Then the
bottleneck group (least capacity for its share of the traffic) gets replicas until none fits.

On several nodes (an instance with variant shares) the variants are first shared out between the
nodes (`assign_variants`: a popular variant may be split over several), and each node is packed on
its own for the traffic it carries (`node_instances`, `union_copies`), as the planner plans
them; a node-blind packing is the fallback when a node's part does not fit.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Optional

from planc.passes.mip import Instance, slots

BALANCE_TOLERANCE = 0.03
"""`assign_variants` evens out the nodes' traffic until none carries more than this above an even share."""
NODE_MEMORY_SHARE = 0.5
"""A variant is copied onto a further node only while that node's weights stay within the most any node
holds already, or within this share of the node's memory (the rest is for replicas and KV)."""


class _State:
    def __init__(self, inst: Instance):
        self.inst = inst
        self.free = [inst.cluster.device.usable_bytes] * inst.cluster.num_devices
        self.copies: dict[tuple, int] = {}
        self.nodes: dict[str, set[int]] = {g.id: set() for g in inst.groups}
        self.replicas: dict[str, int] = {g.id: 0 for g in inst.groups}
        self.capacity: dict[str, float] = {g.id: 0.0 for g in inst.groups}

    def candidate_nodes(self, group) -> list[int]:
        nodes = set(range(self.inst.cluster.nodes))
        for pred in group.predecessors:
            nodes &= self.nodes[pred]
        per = self.inst.cluster.devices_per_node
        return sorted(nodes, key=lambda k: -sum(self.free[k * per:(k + 1) * per]))

    def place(self, group, oi: int) -> bool:
        """One replica of option `oi`, all stages on one node; False (and nothing changed) if none fits."""
        opt = self.inst.options[group.id][oi]
        all_slots = list(enumerate(slots(self.inst.cluster, opt.tp)))
        for node in self.candidate_nodes(group):
            free = list(self.free)
            chosen = []
            for p in range(opt.pp):
                fits = [(si, devs) for si, (k, devs) in all_slots
                        if k == node and all(free[d] >= opt.memory[p] for d in devs)]
                if not fits:
                    break
                si, devs = max(fits, key=lambda s: (min(free[d] for d in s[1]), -s[0]))
                for d in devs:
                    free[d] -= opt.memory[p]
                chosen.append((p, si))
            if len(chosen) < opt.pp:
                continue
            self.free = free
            for p, si in chosen:
                key = (group.id, oi, p, si)
                self.copies[key] = self.copies.get(key, 0) + 1
            self.nodes[group.id].add(node)
            self.replicas[group.id] += 1
            self.capacity[group.id] += opt.cap_rps
            return True
        return False


def _by_preference(inst: Instance, gid: str) -> list[int]:
    opts = inst.options[gid]
    return sorted(range(len(opts)), key=lambda i: (opts[i].num_devices, -opts[i].cap_rps, max(opts[i].memory)))


def greedy_copies(inst: Instance, grow: bool = True) -> Optional[dict[tuple, int]]:
    """Stage copies per (group, option, stage, slot), or None when not even one replica each fits. On
    several nodes each node is packed for the variants and traffic `assign_variants` gives it."""
    if inst.cluster.nodes > 1 and inst.variant_shares:
        parts = []
        for k, sub in node_instances(inst):
            copies = _greedy(sub, grow)
            if copies is None:
                break
            parts.append((k, copies))
        else:
            return union_copies(inst, parts)
    return _greedy(inst, grow)


def _greedy(inst: Instance, grow: bool) -> Optional[dict[tuple, int]]:
    """`greedy_copies` over the whole cluster at once (chains stay on one node, but nodes are not
    balanced)."""
    state = _State(inst)
    by_id = {g.id: g for g in inst.groups}

    def place_any(g) -> bool:
        return any(state.place(g, oi) for oi in _by_preference(inst, g.id))

    def place_with_feeders(g) -> bool:
        """Place g; if the nodes of the groups feeding it are full, open a node with new replicas
        of those feeders (a chain stays on one node)."""
        if place_any(g):
            return True
        feeders = [by_id[p] for p in g.predecessors]
        if not feeders or any(state.replicas[f.id] >= inst.max_replicas for f in feeders):
            return False
        if not all(place_with_feeders(f) for f in feeders):
            return False
        return place_any(g)

    for g in sorted(inst.groups, key=lambda g: g.first_position):
        if not place_with_feeders(g):
            return None
    if not grow:
        return state.copies
    saturated: set[str] = set()
    while True:
        open_groups = [g for g in by_id if g not in saturated and state.replicas[g] < inst.max_replicas]
        if not open_groups:
            break
        # only the bottleneck limits throughput; if it cannot grow, neither can the plan
        gid = min(by_id, key=lambda g: state.capacity[g] / max(inst.shares[g], 1e-12))
        if gid not in open_groups:
            break
        opts = inst.options[gid]
        order = sorted(range(len(opts)), key=lambda i: -opts[i].cap_rps / opts[i].num_devices)
        if not any(state.place(by_id[gid], oi) for oi in order):
            saturated.add(gid)
            break
    return state.copies


def pack_replicas(inst: Instance, replicas: dict[tuple, int],
                  rate: float) -> tuple[Optional[dict[tuple, int]], Optional[int]]:
    """Place the given replicas per (group, option, node) on devices, balancing device time.

    Each stage copy carries its group's share of `rate` (requests/s) split evenly over the group's
    replicas, and takes its device time for that load plus what it takes whatever the load; copies
    go widest and largest first to the slot whose busiest device ends up least busy (memory
    permitting), then single copies move off the busiest device while that helps.
    Returns (stage copies, None), or (None, node) naming a node whose replicas did not fit.
    """
    cluster = inst.cluster
    free = [cluster.device.usable_bytes] * cluster.num_devices
    busy = [0.0] * cluster.num_devices
    per_group = {}
    for (gid, _, _), count in replicas.items():
        per_group[gid] = per_group.get(gid, 0) + count
    items = []
    for (gid, oi, node), count in replicas.items():
        opt = inst.options[gid][oi]
        load = rate * inst.shares[gid] / per_group[gid]
        for _ in range(count):
            for p in range(opt.pp):
                items.append((opt.tp, opt.memory[p], load * opt.tau[p] + opt.busy(p), gid, oi, p, node))
    items.sort(key=lambda it: (-it[0], -it[1], -it[2], it[3], it[4], it[5]))
    placed = []
    for tp, mem, work, gid, oi, p, node in items:
        fits = [(si, devs) for si, (k, devs) in enumerate(slots(cluster, tp))
                if k == node and all(free[d] >= mem for d in devs)]
        if not fits:
            return None, node
        si, devs = min(fits, key=lambda s: (max(busy[d] for d in s[1]) + work, -min(free[d] for d in s[1]), s[0]))
        for d in devs:
            free[d] -= mem
            busy[d] += work
        placed.append([tp, mem, work, gid, oi, p, node, si])
    _rebalance(inst, placed, free, busy)
    copies: dict[tuple, int] = {}
    for _, _, _, gid, oi, p, _, si in placed:
        copies[(gid, oi, p, si)] = copies.get((gid, oi, p, si), 0) + 1
    return copies, None


def _rebalance(inst: Instance, placed: list, free: list[float], busy: list[float], rounds: int = 200) -> None:
    """Move single-device copies off the busiest device while that lowers the busiest load."""
    cluster = inst.cluster
    for _ in range(rounds):
        hot = max(range(len(busy)), key=lambda d: busy[d])
        moved = False
        for item in sorted((it for it in placed if it[0] == 1 and slots(cluster, 1)[it[7]][1][0] == hot),
                           key=lambda it: -it[2]):
            _, mem, work, _, _, _, node, _ = item
            targets = [(si, devs[0]) for si, (k, devs) in enumerate(slots(cluster, 1))
                       if k == node and devs[0] != hot and free[devs[0]] >= mem and busy[devs[0]] + work < busy[hot]]
            if not targets:
                continue
            si, d = min(targets, key=lambda t: busy[t[1]])
            free[hot] += mem
            busy[hot] -= work
            free[d] -= mem
            busy[d] += work
            item[7] = si
            moved = True
            break
        if not moved:
            return


def assign_variants(inst: Instance, split: bool = True) -> list[dict[str, float]]:
    """Per node, the variants it serves and the part of each one's traffic it carries (a variant's parts add
    up to 1).

    Each variant first goes whole to one node, spreading private memory and traffic (the variants with
    the most private memory first). Then, with `split`, while a node carries more than an even share
    of the traffic (by `BALANCE_TOLERANCE`), traffic moves from the busiest node to the least busy:
    of the busiest node's variants, the one whose blocks add the least memory there moves, whole or the
    part that evens the two nodes out (memory permitting, `NODE_MEMORY_SHARE`). A popular variant so gets
    copies on several nodes; whole, it would cap the plan at its node's capacity over its share (8B, 8
    variants, one with 72% of the requests, on 4 nodes of 8 H100: 266 req/s whole, the nodes together
    carry about 730)."""
    shares = inst.variant_shares
    uses = {v: {g.id for g in inst.groups if v in g.users and inst.options[g.id]} for v in shares}
    weights = {g.id: min(sum(m * o.tp for m in o.memory) for o in inst.options[g.id])
               for g in inst.groups if inst.options[g.id]}
    private = {v: sum(weights[g.id] for g in inst.groups if tuple(g.users) == (v,) and g.id in weights) for v in shares}
    nodes = inst.cluster.nodes
    parts: list[dict[str, float]] = [{} for _ in range(nodes)]
    load = [[0.0, 0.0] for _ in range(nodes)]
    total_mem = sum(private.values()) or 1.0
    for v in sorted(private, key=lambda v: (-private[v], -shares[v], v)):
        k = min(range(nodes), key=lambda k: (load[k][0] / total_mem + load[k][1], k))
        parts[k][v] = 1.0
        load[k][0] += private[v]
        load[k][1] += shares[v]
    if not split:
        return parts

    def memory(part) -> float:
        return sum(weights[g] for g in set().union(*(uses[v] for v in part)))

    traffic = [t for _, t in load]
    target = sum(traffic) / nodes
    node_bytes = inst.cluster.device.usable_bytes * inst.cluster.devices_per_node
    for _ in range(4 * len(shares)):
        hot = max(range(nodes), key=lambda k: (traffic[k], -k))
        cold = min(range(nodes), key=lambda k: (traffic[k], k))
        if traffic[hot] <= target * (1 + BALANCE_TOLERANCE):
            break
        room = max(max(memory(p) for p in parts), NODE_MEMORY_SHARE * node_bytes)
        movable = [v for v in parts[hot] if shares[v] > 0 and memory({**parts[cold], v: 1.0}) <= room]
        if not movable:
            break
        v = min(movable, key=lambda v: (memory({**parts[cold], v: 1.0}), -parts[hot][v] * shares[v], v))
        moved = min(parts[hot][v] * shares[v], traffic[hot] - target, target - traffic[cold])
        if moved <= 1e-9:
            break
        parts[cold][v] = parts[cold].get(v, 0.0) + moved / shares[v]
        parts[hot][v] -= moved / shares[v]
        if parts[hot][v] <= 1e-9:
            del parts[hot][v]
        traffic[hot] -= moved
        traffic[cold] += moved
    return parts


def node_instances(inst: Instance, split: bool = True) -> list[tuple[int, Instance]]:
    """One-node instances, one per node `assign_variants` gives variants to (numbered from 0 in that order):
    the groups its variants use, with the traffic it carries of each, as a share of the node's."""
    one_node = inst.cluster.model_copy(update={"nodes": 1})
    parts = [p for p in assign_variants(inst, split) if p]
    out = []
    for k, part in enumerate(parts):
        mine = {v: inst.variant_shares[v] * f for v, f in part.items()}
        total = sum(mine.values()) or 1.0
        groups = [g for g in inst.groups if set(mine) & set(g.users)]
        ids = {g.id for g in groups}
        out.append((k, Instance([replace(g, predecessors=tuple(p for p in g.predecessors if p in ids)) for g in groups],
                                {g.id: inst.options[g.id] for g in groups},
                                {g.id: sum(mine.get(v, 0.0) for v in g.users) / total for g in groups},
                                one_node, inst.objective, (inst.rate or 0.0) * total if inst.rate else None,
                                max(1, inst.max_replicas // len(parts)), {v: x / total for v, x in mine.items()})))
    return out


def union_copies(inst: Instance, parts: list[tuple[int, dict[tuple, int]]]) -> dict[tuple, int]:
    """Stage copies of one-node instances (`node_instances`) as copies on node k of the whole cluster."""
    per = inst.cluster.devices_per_node
    copies: dict[tuple, int] = {}
    for k, node_copies in parts:
        for (gid, oi, p, si), count in node_copies.items():
            key = (gid, oi, p, k * (per // inst.options[gid][oi].tp) + si)
            copies[key] = copies.get(key, 0) + count
    return copies
