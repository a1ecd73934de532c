"""parallelize: the MIP against brute-force enumeration on small instances, and its guarantees."""
from __future__ import annotations

import itertools

import pytest
from ortools.math_opt.python import mathopt

from planc.cluster import Cluster, DeviceProfile, Links
from planc.passes.cost import GroupOption
from planc.passes.greedy import greedy_copies
from planc.passes.mip import DEVICE_TIE_BREAK, Instance, slots
from planc.passes.parallelize import plan_solve
from planc.plan import groups_from_instances


def _cluster(nodes: int, per_node: int, memory_gb: float = 10.0) -> Cluster:
    device = DeviceProfile(name="toy", memory_gb=memory_gb, memory_utilization=1.0, peak_tflops={"bf16": 1.0},
                           mem_bw_gbps=1.0)
    return Cluster(nodes=nodes, devices_per_node=per_node, device=device, links=Links())


def _opt(gid, pp, tp, mem_gb, tau, cap, blocks=("b",), busy=0.0):
    stages = tuple((f"{b}{i}",) for i, b in enumerate(blocks * pp))[:pp]
    return GroupOption(gid, pp, tp, 1, stages, tuple([mem_gb * 1e9] * pp), tuple([tau] * pp), cap, 0.01, 0.1,
                       copy_busy=tuple([busy] * pp) if busy else ())


def _instance(cluster, objective="throughput", rate=None, max_replicas=2, shares=(0.5, 0.5), per_node=False):
    """A trunk shared by two variants, and a private top for each. `per_node`: the variants' shares are
    known, so on several nodes each node runs its own engine (`mip.route_variants`)."""
    groups = groups_from_instances(["embedding", "layer.0", "head"],
                                   {"a": ["e", "l", "ha"], "b": ["e", "l", "hb"]})
    trunk, top_a, top_b = (g.id for g in groups)
    options = {
        trunk: [_opt(trunk, 1, 1, 6.0, 0.10, 8.0), _opt(trunk, 1, 2, 3.5, 0.06, 14.0),
                _opt(trunk, 2, 1, 3.2, 0.05, 16.0)],
        top_a: [_opt(top_a, 1, 1, 3.0, 0.04, 20.0), _opt(top_a, 1, 2, 1.6, 0.03, 30.0)],
        top_b: [_opt(top_b, 1, 1, 4.5, 0.05, 15.0)],
    }
    share = {trunk: 1.0, top_a: shares[0], top_b: shares[1]}
    variant_shares = {"a": shares[0], "b": shares[1]} if per_node else {}
    return Instance(groups, options, share, cluster, objective, rate, max_replicas, variant_shares)


def _route(inst: Instance, copies: dict) -> float:
    """Best objective for a fixed placement: an LP over the routed load (written independently of the MIP)."""
    m = mathopt.Model()
    lam = m.add_variable(lb=0.0)
    busy = {d: [] for d in range(inst.cluster.num_devices)}
    engines = inst.cluster.nodes > 1 and inst.variant_shares  # a node's engine serves what is routed to it
    routed = {(v, k): m.add_variable(lb=0.0) for v in inst.variant_shares for k in range(inst.cluster.nodes)}
    for v, share in inst.variant_shares.items():
        m.add_linear_constraint(sum(routed[(v, k)] for k in range(inst.cluster.nodes)) == share * lam)
    for g in inst.groups:
        stage_loads = {}
        for (gid, oi, p, si), count in copies.items():
            if gid != g.id or not count:
                continue
            opt = inst.options[gid][oi]
            z = m.add_variable(lb=0.0, ub=opt.cap_rps * count)
            node = slots(inst.cluster, opt.tp)[si][0] if engines else 0
            stage_loads.setdefault((oi, node, p), []).append(z)
            for d in slots(inst.cluster, opt.tp)[si][1]:
                busy[d].append(opt.tau[p] * z + count * (opt.copy_busy[p] if opt.copy_busy else 0.0))
        by_option = {}
        for (oi, node, p), zs in stage_loads.items():
            by_option.setdefault((oi, node), []).append(sum(zs))
        y_terms, on_node = [], {}
        for (oi, node), per_stage in by_option.items():
            for other in per_stage[1:]:
                m.add_linear_constraint(other == per_stage[0])
            y_terms.append(per_stage[0])
            on_node.setdefault(node, []).append(per_stage[0])
        m.add_linear_constraint(sum(y_terms) == inst.shares[g.id] * lam)
        if engines:
            for k in range(inst.cluster.nodes):
                m.add_linear_constraint(sum(on_node.get(k, [])) == sum(routed[(v, k)] for v in g.users))
    for terms in busy.values():
        if terms:
            m.add_linear_constraint(sum(terms) <= 1.0)
    used = {d for key, c in copies.items() if c for d in slots(inst.cluster, inst.options[key[0]][key[1]].tp)[key[3]][1]}
    if inst.objective == "devices":
        m.add_linear_constraint(lam == inst.rate)
    m.maximize(lam)
    result = mathopt.solve(m, mathopt.SolverType.GLOP)
    if result.termination.reason != mathopt.TerminationReason.OPTIMAL:
        return None
    if inst.objective == "devices":
        return len(used)
    return result.objective_value() - DEVICE_TIE_BREAK * len(used)


def _valid(inst: Instance, copies: dict) -> bool:
    cluster = inst.cluster
    memory = [0.0] * cluster.num_devices
    nodes_of = {g.id: set() for g in inst.groups}
    for g in inst.groups:
        total = 0
        for oi, opt in enumerate(inst.options[g.id]):
            for node in range(cluster.nodes):
                per_stage = [sum(c for (gid, o, p, si), c in copies.items() if gid == g.id and o == oi and p == s
                                 and slots(cluster, opt.tp)[si][0] == node) for s in range(opt.pp)]
                if len(set(per_stage)) > 1:
                    return False  # a replica's stages must all sit on one node
                total += per_stage[0]
                if per_stage[0]:
                    nodes_of[g.id].add(node)
        if not 1 <= total <= inst.max_replicas:
            return False
    for (gid, oi, p, si), count in copies.items():
        opt = inst.options[gid][oi]
        for d in slots(cluster, opt.tp)[si][1]:
            memory[d] += count * opt.memory[p]
    if any(mem > cluster.device.usable_bytes + 1e-6 for mem in memory):
        return False
    return all(nodes_of[g.id] <= nodes_of[p] for g in inst.groups for p in g.predecessors)


def brute_force(inst: Instance) -> float:
    keys = [(g.id, oi, p, si) for g in inst.groups for oi, opt in enumerate(inst.options[g.id])
            for p in range(opt.pp) for si in range(len(slots(inst.cluster, opt.tp)))]
    best = None
    for counts in itertools.product(range(inst.max_replicas + 1), repeat=len(keys)):
        copies = {k: c for k, c in zip(keys, counts) if c}
        if not _valid(inst, copies):
            continue
        value = _route(inst, copies)
        if value is None:
            continue
        if best is None or (value > best if inst.objective == "throughput" else value < best):
            best = value
    return best


def _options_subset(inst: Instance, keep: dict[str, list[int]]) -> Instance:
    return Instance(inst.groups, {g: [inst.options[g][i] for i in keep[g]] for g in inst.options}, inst.shares,
                    inst.cluster, inst.objective, inst.rate, inst.max_replicas, inst.variant_shares)


CASES = {
    "1x2 devices": (_cluster(1, 2), {"g0": [0, 1], "g1": [0, 1], "g2": [0]}),
    "1x2 devices, pipeline": (_cluster(1, 2), {"g0": [0, 2], "g1": [0], "g2": [0]}),
    "2 nodes x1, locality": (_cluster(2, 1, memory_gb=11.0), {"g0": [0], "g1": [0], "g2": [0]}),
    "1x4 devices": (_cluster(1, 4, memory_gb=8.0), {"g0": [1], "g1": [0], "g2": [0]}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_mip_objective_equals_brute_force(case):
    cluster, keep = CASES[case]
    inst = _options_subset(_instance(cluster), keep)
    expected = brute_force(inst)
    sol = plan_solve(inst, time_limit_s=30, gap=0.0, method="exact")
    assert expected is not None and sol.copies
    assert sol.objective == pytest.approx(expected, rel=1e-6, abs=1e-6)
    assert sol.status == "optimal"


def test_per_node_engines_equal_brute_force_and_route_what_each_node_carries():
    """Two nodes of one device, each with its own engine, uneven traffic: a node's trunk carries only the
    traffic of the tops on that node. The optimum equals brute force with that routing, is below the
    optimum that lets any trunk copy carry any request, and its routes add up node by node."""
    cluster, keep = _cluster(2, 1, memory_gb=11.0), {"g0": [0], "g1": [0], "g2": [0]}
    inst = _options_subset(_instance(cluster, shares=(0.8, 0.2), per_node=True), keep)
    free = _options_subset(_instance(cluster, shares=(0.8, 0.2)), keep)
    sol = plan_solve(inst, time_limit_s=30, gap=0.0, method="exact")
    assert sol.objective == pytest.approx(brute_force(inst), rel=1e-6)
    assert sol.objective < brute_force(free) - 1.0
    for v, share in inst.variant_shares.items():
        assert sum(x for (u, _), x in sol.routes.items() if u == v) == pytest.approx(share * sol.lam, rel=1e-6)
    for g in inst.groups:
        for k in range(cluster.nodes):
            carried = sum(z for (gid, oi, p, si), z in sol.load.items()
                          if gid == g.id and p == 0 and slots(cluster, inst.options[gid][oi].tp)[si][0] == k)
            assert carried == pytest.approx(sum(sol.routes[(v, k)] for v in g.users), abs=1e-4)  # solver tolerance


def _tops(busy: float, max_replicas: int = 1) -> Instance:
    """A trunk and five private tops with uneven traffic on two devices; every copy takes `busy` of
    its device whatever its load (the weights its steps stream)."""
    names = "abcde"
    groups = groups_from_instances(["embedding", "layer.0", "head"], {v: ["e", "l", f"h{v}"] for v in names})
    options = {groups[0].id: [_opt(groups[0].id, 1, 1, 4.0, 0.05, 30.0, busy=busy)]}
    shares = {groups[0].id: 1.0}
    for g, share, tau in zip(groups[1:], (0.4, 0.3, 0.15, 0.1, 0.05), (0.02, 0.03, 0.05, 0.04, 0.06)):
        options[g.id] = [_opt(g.id, 1, 1, 1.5, tau, 25.0, busy=busy)]
        shares[g.id] = share
    return Instance(groups, options, shares, _cluster(1, 2, memory_gb=9.0), "throughput", None, max_replicas)


@pytest.mark.parametrize("busy", [0.0, 0.12])
def test_many_groups_on_few_devices_equal_brute_force(busy):
    """Six block groups packed onto two devices, with and without a load-independent part."""
    inst = _tops(busy)
    sol = plan_solve(inst, time_limit_s=30, gap=0.0, method="exact")
    assert sol.objective == pytest.approx(brute_force(inst), rel=1e-6)


def _restricted_growth(n: int, k: int):
    """Every assignment of n items to at most k interchangeable bins, once each (bins numbered by first use)."""
    def grow(prefix: list[int], used: int):
        if len(prefix) == n:
            yield tuple(prefix)
            return
        for b in range(min(used + 1, k)):
            yield from grow(prefix + [b], max(used, b + 1))
    yield from grow([], 0)


def test_eight_groups_on_four_devices_equal_brute_force():
    """The issue's largest small instance: 8 block groups (a trunk with two layouts and seven private tops) on
    one node of 4 devices, one replica each. Brute force tries every layout choice and every placement up to
    relabelling the devices (they are interchangeable: one node, TP 1): 2 x 2795 placements."""
    names = "abcdefg"
    groups = groups_from_instances(["embedding", "layer.0", "head"], {v: ["e", "l", f"h{v}"] for v in names})
    trunk = groups[0].id
    options = {trunk: [_opt(trunk, 1, 1, 4.0, 0.05, 30.0, busy=0.1), _opt(trunk, 1, 1, 2.5, 0.08, 30.0, busy=0.1)]}
    shares = {trunk: 1.0}
    for g, share, tau, mem in zip(groups[1:], (0.3, 0.2, 0.15, 0.12, 0.1, 0.08, 0.05),
                                  (0.02, 0.03, 0.05, 0.04, 0.06, 0.03, 0.05), (2.0, 1.5, 2.5, 3.0, 1.0, 2.0, 3.5)):
        options[g.id] = [_opt(g.id, 1, 1, mem, tau, 25.0, busy=0.05)]
        shares[g.id] = share
    inst = Instance(groups, options, shares, _cluster(1, 4, memory_gb=6.0), "throughput", None, 1)
    best, tried = None, 0
    for trunk_option in range(2):
        for devices in _restricted_growth(len(groups), 4):
            copies = {(g.id, trunk_option if g.id == trunk else 0, 0, d): 1 for g, d in zip(groups, devices)}
            if _valid(inst, copies):
                tried += 1
                value = _route(inst, copies)
                if value is not None and (best is None or value > best):
                    best = value
    assert tried > 100 and best is not None
    sol = plan_solve(inst, time_limit_s=60, gap=0.0, method="exact")
    assert sol.status == "optimal" and sol.objective == pytest.approx(best, rel=1e-6)


def test_copies_pay_for_their_weights_whatever_their_load():
    """Each copy's load-independent device time lowers what the devices carry, and an extra replica of
    a group is no longer free on a device with time left (two replicas of the trunk: 0.12 each)."""
    free, paid = (plan_solve(_tops(busy, max_replicas=2), time_limit_s=30, gap=0.0, method="exact")
                  for busy in (0.0, 0.12))
    assert paid.objective < free.objective - 0.5
    # six copies at 0.12 on two devices leave 2 - 0.72 of device time for the load
    load_time = sum(z * inst_opt.tau[p] for (g, oi, p, si), z in paid.load.items()
                    for inst_opt in [_tops(0.12).options[g][oi]])
    copies = sum(paid.copies.values())
    assert load_time + 0.12 * copies <= 2.0 + 1e-6


def test_fewest_devices_objective_equals_brute_force():
    cluster, keep = CASES["1x4 devices"]
    inst = _options_subset(_instance(cluster, objective="devices", rate=9.0), keep)
    expected = brute_force(inst)
    sol = plan_solve(inst, time_limit_s=30, gap=0.0, method="exact")
    assert expected is not None and len(sol.used) == expected
    # more traffic needs more devices
    busier = _options_subset(_instance(cluster, objective="devices", rate=14.0), keep)
    assert len(plan_solve(busier, time_limit_s=30, gap=0.0, method="exact").used) > expected


def test_solution_is_deterministic_and_never_below_the_greedy_packer():
    inst = _instance(_cluster(1, 4, memory_gb=8.0), max_replicas=3)
    first = plan_solve(inst, time_limit_s=30, gap=0.0, seed=3)
    again = plan_solve(inst, time_limit_s=30, gap=0.0, seed=3)
    assert first.copies == again.copies and first.objective == again.objective
    greedy = greedy_copies(inst)
    assert greedy is not None and first.objective >= _route(inst, greedy) - 1e-9


def test_node_level_method_gives_a_valid_placement_and_bound():
    inst = _instance(_cluster(2, 4, memory_gb=8.0), max_replicas=3)
    exact = plan_solve(inst, time_limit_s=30, gap=0.0, method="exact")
    nodes = plan_solve(inst, time_limit_s=3, gap=0.0, method="node-level")
    assert _valid(inst, nodes.copies)
    assert nodes.objective <= exact.objective + 1e-9 <= nodes.bound + 1e-6


@pytest.mark.parametrize("busy", [0.0, 0.12])
def test_evaluating_a_placement_equals_the_independent_routing_lp(busy):
    """`evaluate` (the exact model with the integers fixed) against the LP written here, on every
    placement of one copy per group on two devices, valid or not."""
    from planc.passes.mip import evaluate

    inst = _tops(busy)
    keys = [(g.id, 0, 0, si) for g in inst.groups for si in range(2)]
    checked = 0
    for counts in itertools.product(range(2), repeat=len(keys)):
        copies = {k: c for k, c in zip(keys, counts) if c}
        expected = _route(inst, copies) if _valid(inst, copies) else None
        sol = evaluate(inst, copies)
        if expected is None:
            assert not sol.copies
        else:
            assert sol.copies and sol.objective == pytest.approx(expected, rel=1e-6, abs=1e-9)
            checked += 1
    assert checked > 10


def test_node_level_search_stops_on_node_counts_not_the_clock(monkeypatch):
    """With a small effort, node limits (which SCIP reproduces exactly) end every search, so two runs give one placement and the clock is never reported as the cause."""
    import planc.passes.mip as mip

    calls = []
    solve_nodes = mip.solve_nodes

    def counted(*args, **kwargs):
        result = solve_nodes(*args, **kwargs)
        calls.append((kwargs["max_nodes"], result.nodes, result.status))
        return result

    monkeypatch.setattr("planc.passes.parallelize.solve_nodes", counted)
    effort = 3 * (mip.ROOT_NODES + mip.MIN_NODES)  # a few small rounds, whatever the model's size
    monkeypatch.setattr("planc.passes.parallelize.node_level_limit", lambda inst, seconds: effort)
    inst = _instance(_cluster(2, 4, memory_gb=8.0), max_replicas=3)
    first = plan_solve(inst, time_limit_s=30, gap=0.0, method="node-level")
    again = plan_solve(inst, time_limit_s=30, gap=0.0, method="node-level")
    assert first.copies == again.copies and first.objective == again.objective
    assert not first.time_limit_hit and _valid(inst, first.copies)
    assert calls and all(nodes <= limit and status != "time_limit" for limit, nodes, status in calls)
    assert sum(mip.ROOT_NODES + nodes for _, nodes, _ in calls) <= 2 * effort  # first and again


def test_plan_solve_keeps_the_restricted_candidate_its_score_prefers():
    """With a `score` (the engines' view; here: fewer pipelined copies), the node-level search is also run
    without pipelined layouts and the candidate that scores `CANDIDATE_MARGIN` more is kept, its copies
    indexing the full instance's options; where the score agrees with the MIP, the MIP's plan stands."""
    from planc.passes.mip import evaluate
    from planc.passes.parallelize import restricted

    inst = _instance(_cluster(1, 4), per_node=True)
    assert [label for label, _ in restricted(inst)] == ["unpipelined"]  # every option here has batch 1

    def pipelined(i: Instance, sol) -> int:
        return sum(c for (g, o, _, _), c in sol.copies.items() if i.options[g][o].pp > 1)

    plain = plan_solve(inst, time_limit_s=3, gap=0.0, method="node-level")
    assert pipelined(inst, plain) > 0  # the MIP alone pipelines the trunk here
    chosen = plan_solve(inst, time_limit_s=3, gap=0.0, method="node-level", score=lambda i, s: 1 - pipelined(i, s))
    assert chosen.copies and pipelined(inst, chosen) == 0 and chosen.method.endswith("unpipelined")
    assert evaluate(inst, chosen.copies).lam == pytest.approx(chosen.lam, rel=1e-6)
    assert chosen.bound == pytest.approx(plain.bound)  # the full instance's bound, not the restricted one's
    keen = plan_solve(inst, time_limit_s=3, gap=0.0, method="node-level", score=lambda i, s: 1 + pipelined(i, s))
    assert keen.copies == plain.copies
