"""A greedy packer over the same options as the MIP: the planner's baseline and its warm start.

Groups are placed in chain order (trunks before the tops that follow them), each with the
option that needs the fewest devices and, among those, serves the most; stages go worst-fit
(the device with the most free memory) on a node that hosts the groups feeding it. Then the
bottleneck group (least capacity for its share of the traffic) gets replicas until none fits.
"""
from __future__ import annotations

from typing import Optional

from planc.passes.mip import Instance, slots


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
    """Stage copies per (group, option, stage, slot), or None when not even one replica each fits."""
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
