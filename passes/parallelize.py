"""parallelize: choose TP/PP/DP and device placement for every block group (OR-Tools MIP).

The model (passes/mip.py) picks, per block group, layouts from the cost pass's options (pipeline
depth, tensor-parallel degree, decode batch), how many replicas of each on which node, which
aligned device slots hold their stages (stages of different groups may share a device), and how
the traffic is routed, under device memory and device time, one node per replica and chain
locality, for the spec's objective. Small instances are solved exactly at slot level; larger ones
solve a node-level relaxation (whose optimum bounds the exact one) and pack each node, retrying
with less memory on a node that did not pack. The greedy packer's placement is the fallback and
the baseline; every placement is scored by the same exact model (integers fixed, routing an LP).
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Callable, Mapping, Optional

from planc.errors import PlancError
from planc.pass_manager import Pass, PassContext
from planc.passes.cost import gb
from planc.passes.greedy import assign_variants, greedy_copies, node_instances, pack_replicas, union_copies
from planc.passes.mip import (MIN_NODES, ROOT_NODES, Instance, Solution, group_shares, node_level_limit, relative_gap,
                              relaxation_bound, slots, solve as solve_exact, solve_nodes)
from planc.lane_model import settle
from planc.plan import BlockGroup, Plan, StagePlacement
from planc.program import Program

EXACT_MAX_SLOT_VARIABLES = 150
"""Instances with at most this many slot-level integer variables are solved exactly."""
MAX_ROUNDS = 6
"""Relaxation + packing rounds per solve (each must beat the previous plan)."""


def slot_variables(inst: Instance) -> int:
    return sum(o.pp * len(slots(inst.cluster, o.tp)) for opts in inst.options.values() for o in opts)


def better(a: Optional[Solution], b: Optional[Solution], objective: str) -> Optional[Solution]:
    if a is None or not a.copies:
        return b
    if b is None or not b.copies:
        return a
    return a if (a.objective >= b.objective if objective == "throughput" else a.objective <= b.objective) else b


def _beat(best: Optional[Solution], objective: str, gap: float) -> Optional[float]:
    """What the next relaxation must reach to be worth packing."""
    if best is None or not best.copies:
        return None
    return best.lam * (1 + max(gap, 0.005)) if objective == "throughput" else len(best.used) - 1


Score = Callable[[Instance, Solution], float]
"""How the engines would run a solution of an instance (`engine_score`): what picks between candidates
that the MIP's own figure cannot tell apart."""


CANDIDATE_EFFORT = 1.0
"""Search effort of each restricted candidate, as a share of the full search's (`plan_solve` with `score`)."""
CANDIDATE_MARGIN = 0.05
"""A restricted candidate replaces the full search's plan only when its score is this much higher: engine
capacity came within 0.77-1.07 of the simulated capacity (sessions 8 and 9), so closer plans are not ranked."""
SIMULATED_CANDIDATES = 3
"""With plan.simulate: how many of the search's candidates (the one chosen, then the best by engine capacity)
the simulator ranks, beside the greedy packer's; each costs a capacity search (seconds to minutes)."""


def plan_solve(inst: Instance, time_limit_s: float = 10.0, gap: float = 0.01, seed: int = 0,
               solver: str = "scip", method: str = "auto", backstop_s: Optional[float] = None,
               score: Optional[Score] = None, pool: Optional[list[Solution]] = None) -> Solution:
    """The best placement found within the search effort, its objective and a valid bound.

    `time_limit_s` sets the search effort as branch-and-bound nodes (`mip.WORK_PER_SECOND`), which
    makes the result the same for a seed on every run and machine; `backstop_s` (default twice
    `time_limit_s`) is the wall clock that stops a search anyway on a slow or busy machine, recorded
    as `time_limit_hit`.

    `score` (how the engines would run a solution, `engine_score`): instances too large to solve
    exactly are also solved restricted to one decode batch for every group, and without pipelined
    layouts (`restricted`), each with `CANDIDATE_EFFORT` of the full search's effort (and a backstop of
    twice that), and the restricted candidate with the highest score replaces the full search's plan
    if it scores `CANDIDATE_MARGIN` more; on several nodes, each node's plan is chosen so. The MIP
    lets every copy step at its own pace; an engine steps a stage's copies together (a batch-128 copy
    beside a batch-512 one runs at the larger's step) and reaches a pipelined copy's overlapped pace
    only with several lanes. 8B x 32
    variants on 8 H100: the full search keeps the greedy packer's mixed batches (MIP 224.8 req/s,
    engine 124.1, simulated 126.4); without pipelined layouts it finds MIP 310.9, engine 312.3,
    simulated 291.4.

    `pool`, when given, receives every candidate placement scored (as solutions of `inst`): the full
    search's and each restricted one's, or on several nodes each assignment's union; the chosen one is
    among them (the simulator re-ranks them: `ParallelizePass`)."""
    import time

    start = time.perf_counter()
    deadline = start + (2 * time_limit_s if backstop_s is None else backstop_s)
    exact = method == "exact" or (method == "auto" and slot_variables(inst) <= EXACT_MAX_SLOT_VARIABLES)
    if score is None or exact or (inst.cluster.nodes > 1 and inst.variant_shares and method == "auto"):
        sol = _search(inst, time_limit_s, gap, seed, solver, method, start, deadline, score, pool)
        if pool is not None and sol.copies and not any(c is sol for c in pool):
            pool.append(sol)
        return sol
    main = _search(inst, time_limit_s, gap, seed, solver, method, start, deadline, None)
    if not main.copies:
        return main
    if pool is not None:
        pool.append(main)
    alternative, best = None, 0.0
    for label, sub in restricted(inst):
        effort, now = time_limit_s * CANDIDATE_EFFORT, time.perf_counter()
        alt = _search(sub, effort, gap, seed, solver, "node-level", now, now + 2 * effort, None)  # own backstop
        main.time_limit_hit = main.time_limit_hit or alt.time_limit_hit
        if not alt.copies:
            continue
        value = score(sub, alt)
        alt = _with_options(alt, sub, inst)
        alt.method = f"{alt.method}, {label}"
        if pool is not None:
            pool.append(alt)
        if value > best:
            alternative, best = alt, value
    chosen = alternative if alternative is not None and best > score(inst, main) * (1 + CANDIDATE_MARGIN) else main
    if chosen is not main:
        chosen.bound = main.bound  # the full instance's bound (a restricted one bounds less)
        chosen.status = "optimal" if chosen.gap <= gap + 1e-9 else "feasible"
        chosen.time_limit_hit = main.time_limit_hit or chosen.time_limit_hit
    chosen.seconds = time.perf_counter() - start
    return chosen


def restricted(inst: Instance) -> list[tuple[str, Instance]]:
    """The instance restricted to one decode batch for every group (per batch size; a group without
    layouts at that batch keeps all of its own), and without pipelined layouts where a group has
    unpipelined ones: the candidates `plan_solve` scores, labelled. Only those that drop something."""
    out = []
    batches = sorted({o.batch for opts in inst.options.values() for o in opts})
    for label, keep in [(f"batch {b}", lambda o, b=b: o.batch == b) for b in batches] + \
                       [("unpipelined", lambda o: o.pp == 1)]:
        options = {gid: [o for o in opts if keep(o)] or opts for gid, opts in inst.options.items()}
        if any(len(options[gid]) < len(opts) for gid, opts in inst.options.items()):
            out.append((label, replace(inst, options=options)))
    return out


def _search(inst: Instance, time_limit_s: float, gap: float, seed: int, solver: str, method: str, start: float,
            deadline: float, score: Optional[Score], pool: Optional[list[Solution]] = None) -> Solution:
    """`plan_solve`'s search of one instance (exact, per node, or node-level rounds)."""
    import time

    greedy = greedy_copies(inst)
    if method not in ("auto", "exact", "node-level"):
        raise PlancError(f"plan: unknown method {method!r} (auto, exact, node-level)")
    if method == "exact" or (method == "auto" and slot_variables(inst) <= EXACT_MAX_SLOT_VARIABLES):
        sol = solve_exact(inst, max(deadline - start, 0.1), gap, seed, solver, hint=greedy, effort_s=time_limit_s)
        sol.method = "exact"
        return sol
    best = solve_exact(inst, max(deadline - start, 1.0), 0.0, seed, solver, fixed=greedy) if greedy else None
    if best is not None and not best.copies:
        best = None  # the greedy placement cannot carry the required rate
    if best is not None:
        best.method = "greedy"
    if inst.cluster.nodes > 1 and inst.variant_shares and method == "auto":
        return _per_node(inst, best, time_limit_s, gap, seed, solver, start, deadline, score, pool)
    scale = [1.0] * inst.cluster.nodes
    bound, floor = float("nan"), None  # the first relaxation runs without a floor: it gives the bound
    time_limit_hit = False
    nodes_left = node_level_limit(inst, time_limit_s)
    for _ in range(MAX_ROUNDS):
        # short relaxations (a third of the effort left each), each asked to beat the incumbent, so
        # that several packings fit (a relaxation whose replicas do not pack is retried with less
        # memory: one long first round would leave no effort for that)
        if nodes_left < ROOT_NODES + MIN_NODES:
            break
        if (left := deadline - time.perf_counter()) <= 0:
            time_limit_hit = True
            break
        result = solve_nodes(inst, scale, left, gap, seed, solver, floor,
                             max_nodes=max(MIN_NODES, (nodes_left - ROOT_NODES) // 3))
        replicas, node_bound, status = result.replicas, result.bound, result.status
        nodes_left -= ROOT_NODES + result.nodes
        time_limit_hit = time_limit_hit or status == "time_limit"
        unscaled = all(x == 1.0 for x in scale)
        if replicas is None:
            if status == "infeasible" and unscaled and floor is not None and inst.objective == "throughput":
                bound = floor  # nothing reaches the floor even with every node's full memory
            break
        if unscaled and math.isfinite(node_bound):
            # the relaxation bounds the exact model (a floor only cuts off worse solutions)
            bound = node_bound if math.isnan(bound) else (min(bound, node_bound) if inst.objective == "throughput"
                                                           else max(bound, node_bound))
        copies, failed = pack_replicas(inst, replicas, result.lam)
        if copies is None:
            scale[failed] *= 0.95  # the node did not pack: ask the relaxation for less memory there
            continue
        sol = solve_exact(inst, max(deadline - time.perf_counter(), 1.0), 0.0, seed, solver, fixed=copies)
        sol.method = "node-level"
        best = better(sol, best, inst.objective)
        if best is None:
            break
        floor = _beat(best, inst.objective, gap)
        if inst.objective == "throughput" and not math.isnan(bound) and best.objective >= bound / (1 + gap):
            break
        if inst.objective == "devices" and floor < 1:
            break
    if best is None:
        return Solution(status="infeasible", objective=float("nan"), bound=bound,
                        seconds=time.perf_counter() - start, lam=0.0, time_limit_hit=time_limit_hit)
    best.bound = bound if not math.isnan(bound) else relaxation_bound(inst)
    best.seconds = time.perf_counter() - start
    best.status = "optimal" if best.gap <= gap + 1e-9 else "feasible"  # the fixed LP's status says nothing
    best.time_limit_hit = time_limit_hit
    return best


def _per_node(inst: Instance, best: Optional[Solution], time_limit_s: float, gap: float, seed: int,
              solver: str, start: float, deadline: float, score: Optional[Score] = None,
              pool: Optional[list[Solution]] = None) -> Solution:
    """Multi-node clusters: give each node a set of variants and a part of their traffic
    (`greedy.assign_variants`: a popular one may be split over nodes), plan each node on its own (the
    groups its variants need, the traffic it carries), then score the union exactly (which routes
    each variant's traffic over the nodes that hold its chain). A chain never leaves its node.
    Each node gets an equal share of the effort; the wall clock left is shared out as its backstop.
    When the split differs from keeping every variant whole on one node, both are planned (each with
    the full effort) and the better union is kept (by `score`, else by the MIP's objective).

    With `score`, each node keeps the candidate its engine runs fastest (`plan_solve`): the MIP ranks
    plans alike that engines do not (70B x 32 variants on 2 nodes: 2 x TP4 trunk copies and one
    PP2 x TP4 copy had the same MIP figure, engine capacities 26.0 and 16.1 req/s). The union is then
    compared with the greedy placement by `score` too."""
    import time

    splits = [True] + ([False] if assign_variants(inst) != assign_variants(inst, split=False) else [])
    hit, chosen = False, best
    value = score(inst, best) if score is not None and best is not None and best.copies else None  # greedy's, once
    for i, split in enumerate(splits):  # each assignment a candidate; each gets the full effort
        stop = time.perf_counter() + (deadline - time.perf_counter()) / (len(splits) - i)
        copies, node_hit = _plan_nodes(inst, split, time_limit_s, gap, seed, solver, stop, score)
        hit = hit or node_hit
        if copies is None:
            continue
        whole = solve_exact(inst, max(stop - time.perf_counter(), 1.0), 0.0, seed, solver, fixed=copies)
        whole.method = "per-node" if len(splits) == 1 else f"per-node, {'split' if split else 'whole'} variants"
        if not whole.copies:
            continue
        if pool is not None:
            pool.append(whole)
        if score is None:
            chosen = better(whole, chosen, inst.objective)
            continue
        mine = score(inst, whole)
        if value is None or mine >= value:
            chosen, value = whole, mine
    if chosen is None:
        return Solution(status="infeasible", objective=float("nan"), bound=relaxation_bound(inst),
                        seconds=time.perf_counter() - start, lam=0.0, time_limit_hit=hit)
    chosen.bound = relaxation_bound(inst)
    chosen.seconds = time.perf_counter() - start
    chosen.status = "feasible"
    chosen.time_limit_hit = hit
    return chosen


def _plan_nodes(inst: Instance, split: bool, time_limit_s: float, gap: float, seed: int, solver: str,
                deadline: float, score: Optional[Score]) -> tuple[Optional[dict[tuple, int]], bool]:
    """Each node planned on its own for what `node_instances(inst, split)` gives it: the union of their
    stage copies (None when a node's part has no plan), and whether a search hit its time limit."""
    import time

    subs, parts, hit = node_instances(inst, split), [], False
    for k, sub in subs:
        backstop = (deadline - time.perf_counter()) / (len(subs) - k) * 0.9
        sol = plan_solve(sub, time_limit_s / len(subs) * 0.9, gap, seed, solver, backstop_s=max(backstop, 0.5),
                         score=score)
        hit = hit or sol.time_limit_hit
        if not sol.copies:
            return None, hit
        parts.append((k, sol.copies))
    return union_copies(inst, parts), hit


def _with_options(sol: Solution, solved: Instance, target: Instance) -> Solution:
    """A solution of `solved` (a subset of `target`'s options) with option indices into `target`'s."""
    index = {gid: [target.options[gid].index(o) for o in opts] for gid, opts in solved.options.items()}
    sol.copies = {(g, index[g][o], p, si): c for (g, o, p, si), c in sol.copies.items()}
    sol.load = {(g, index[g][o], p, si): z for (g, o, p, si), z in sol.load.items()}
    return sol


def engine_score(cluster_name: str, params: dict, settings: dict) -> Score:
    """`Score` by engine capacity (`planc.lane_model`): the solution as a settled plan, its
    `engine_capacity_rps` with the instance's traffic."""
    def score(inst: Instance, sol: Solution) -> float:
        plan = to_plan(inst, sol, cluster_name, params)
        settle(plan, {**settings, "shares": dict(inst.variant_shares) or settings.get("shares")})
        return plan.predicted["engine_capacity_rps"]
    return score


def placement_plan(inst: Instance, copies: Optional[dict], cluster_name: str, params: dict, settings: dict,
                   method: Optional[str] = None) -> Optional[Plan]:
    """A given placement (stage copies, e.g. the greedy packer's) as a plan: scored by the exact model
    with its integers fixed, lanes settled as the planner's are; None when there is none or it cannot
    carry any load."""
    if not copies:
        return None
    sol = solve_exact(inst, 30.0, 0.0, fixed=copies)
    if not sol.copies:
        return None
    if method:
        sol.method = method
    plan = to_plan(inst, sol, cluster_name, params)
    settle(plan, settings)
    return plan


def _idle_options(sol: Solution, gid: str) -> set[int]:
    """Layouts of a group that the routing leaves without load while another carries it: the MIP may
    keep such copies (they cost no objective on devices already in use); deploying them would not."""
    load: dict[int, float] = {}
    for (g, o, p, si), z in sol.load.items():
        if g == gid and p == 0:
            load[o] = load.get(o, 0.0) + z
    if not any(z > 1e-9 for z in load.values()):
        return set()
    return {o for o, z in load.items() if z <= 1e-9}


def _placement_key(plan: Plan) -> tuple:
    """What two plans with the same stage copies on the same devices share (their loads may differ)."""
    return tuple(sorted((p.group, p.stage, p.blocks, p.devices, p.tp, p.batch) for p in plan.placements))


def to_plan(inst: Instance, sol: Solution, cluster_name: str, settings: dict) -> Plan:
    """Expand stage copies into placements; pair copies on a node into replicas."""
    placements: list[StagePlacement] = []
    groups_out = []
    by_id = {g.id: g for g in inst.groups}
    for g in inst.groups:
        chosen = []
        idle = _idle_options(sol, g.id)
        for oi, opt in enumerate(inst.options[g.id]):
            per_stage_node: dict[tuple[int, int], list[tuple[tuple[int, ...], float]]] = {}
            for (gid, o, p, si), count in sorted(sol.copies.items()):
                if gid != g.id or o != oi or o in idle:
                    continue
                node, devices = slots(inst.cluster, opt.tp)[si]
                per_copy = sol.load[(gid, o, p, si)] / count
                per_stage_node.setdefault((node, p), []).extend([(devices, per_copy)] * count)
            nodes = sorted({node for node, _ in per_stage_node})
            replicas = 0
            for node in nodes:
                copies = [per_stage_node[(node, p)] for p in range(opt.pp)]
                for copy_set in zip(*copies):
                    for p, (devices, load) in enumerate(copy_set):
                        placements.append(StagePlacement(
                            group=g.id, replica=replicas, stage=p, blocks=opt.stages[p], devices=devices,
                            node=node, tp=opt.tp, batch=opt.batch, memory_gb=opt.memory[p] / 1e9, load_rps=load))
                    replicas += 1
            if replicas:
                chosen.append({"pp": opt.pp, "tp": opt.tp, "batch": opt.batch, "replicas": replicas,
                               "stage_blocks": [len(st) for st in opt.stages],
                               "tpot_ms": opt.tpot_s * 1e3, "ttft_ms": opt.ttft_s * 1e3,
                               "cap_rps": opt.cap_rps, "tau_ms": [t * 1e3 for t in opt.tau],
                               "fixed_ms": [t * 1e3 for t in opt.fixed_s]})
        groups_out.append({"id": g.id, "blocks": [g.blocks[0], g.blocks[-1]], "num_blocks": g.num_positions,
                           "first_position": g.first_position, "instance_keys": list(g.instance_keys),
                           "users": list(g.users), "share": inst.shares[g.id], "layouts": chosen,
                           "lora": [u.variant for u in g.lora]})
    predicted = _predict(inst, sol, groups_out, by_id)
    solver = {"method": sol.method, "status": sol.status, "time_limit_hit": sol.time_limit_hit,
              "objective": sol.objective, "bound": sol.bound, "gap": sol.gap,
              "seconds": sol.seconds, **settings}
    return Plan(cluster=cluster_name, objective=inst.objective, groups=groups_out, placements=placements,
                predicted=predicted, solver=solver, settings={}, routes=_routes(inst, sol, placements))


def _routes(inst: Instance, sol: Solution, placements: list[StagePlacement]) -> dict[str, dict[str, float]]:
    """Variant -> node -> the part of its traffic that node's engine serves: the solution's routing; a
    variant it sends nothing (no traffic share) goes to the first node that holds its whole chain."""
    totals: dict[str, float] = {}
    for (v, _), x in sol.routes.items():
        totals[v] = totals.get(v, 0.0) + x
    out: dict[str, dict[str, float]] = {}
    for (v, k), x in sorted(sol.routes.items()):
        if totals[v] > 0 and x > 1e-9 * totals[v]:
            out.setdefault(v, {})[str(k)] = x / totals[v]
    hosts = {g.id: {p.node for p in placements if p.group == g.id} for g in inst.groups}
    for v in sorted({v for g in inst.groups for v in g.users} - set(out)):
        whole = set.intersection(*[hosts[g.id] for g in inst.groups if v in g.users])
        if whole:
            out[v] = {str(min(whole)): 1.0}
    return out


def _predict(inst: Instance, sol: Solution, groups_out: list[dict], by_id: dict[str, BlockGroup]) -> dict:
    variants = sorted({v for g in inst.groups for v in g.users})
    per_variant = {}
    for v in variants:
        tpot = ttft = 0.0
        for gout in groups_out:
            if v not in gout["users"]:
                continue
            total = sum(lay["replicas"] * lay["cap_rps"] for lay in gout["layouts"]) or 1.0
            tpot += sum(lay["tpot_ms"] * lay["replicas"] * lay["cap_rps"] for lay in gout["layouts"]) / total
            ttft += sum(lay["ttft_ms"] * lay["replicas"] * lay["cap_rps"] for lay in gout["layouts"]) / total
        per_variant[v] = {"tpot_ms": tpot, "ttft_ms": ttft}
    memory: dict[int, float] = {}
    for (gid, oi, p, si), count in sol.copies.items():
        opt = inst.options[gid][oi]
        for d in slots(inst.cluster, opt.tp)[si][1]:
            memory[d] = memory.get(d, 0.0) + count * opt.memory[p] / 1e9
    return {"throughput_rps": sol.lam, "devices": len(sol.used), "variants": per_variant,
            "memory_gb": {str(d): round(m, 3) for d, m in sorted(memory.items())}}


def explain_infeasible(inst: Instance, no_layout: Optional[Mapping[str, str]] = None) -> str:
    """What would make an infeasible instance fit. `no_layout`: per group without options, why
    (`OptionBuilder.no_layout`)."""
    cluster = inst.cluster
    dev = cluster.device
    for g in inst.groups:
        if not inst.options[g.id]:
            why = (no_layout or {}).get(g.id) or (f"none meets the SLO and fits {dev.memory_gb:g} GB per device: relax "
                                                  f"plan.slo, or use more or larger devices per node")
            return (f"block group {g.id} ({g.blocks[0]}..{g.blocks[-1]}, used by {', '.join(g.users[:4])}) has no "
                    f"layout within one node of {cluster.devices_per_node} {dev.name}: {why}")
    need = sum(min(sum(m * o.tp for m in o.memory) for o in inst.options[g.id]) for g in inst.groups)
    devices = math.ceil(need / dev.usable_bytes)
    if devices > cluster.num_devices:
        widest = max(max(o.tp for o in inst.options[g.id]) for g in inst.groups)
        return (f"one replica of every block group needs {gb(need)} GB, at least {devices} {dev.name} "
                f"devices ({dev.memory_gb:g} GB at {dev.memory_utilization:.0%} usable); the cluster has "
                f"{cluster.num_devices}: needs {devices - cluster.num_devices} more, or larger devices "
                f"(widest layout that meets the SLO: TP {widest})")
    return (f"no placement of the {len(inst.groups)} block groups fits {cluster.num_devices} devices "
            f"(memory packing or the rate): add devices or relax plan.slo/plan.rate")


class ParallelizePass(Pass):
    """The MIP over the cost pass's options; writes `program.plan`."""

    name = "parallelize"
    requires = ("groups", "plan_options")
    provides = ("plan",)

    def run(self, program: Program, ctx: PassContext) -> bool:
        settings = program.spec.plan
        inputs = program.extras["plan_inputs"]
        cluster, traffic = inputs["cluster"], inputs["traffic"]
        rate = settings.rate or traffic.rate
        if settings.objective == "devices" and rate is None:
            raise PlancError(f"{program.spec.source}: plan.objective `devices` needs plan.rate "
                             "(requests/s) or a plan.workload with arrival times")
        inst = Instance(program.groups, program.plan_options, group_shares(program.groups, traffic.shares),
                        cluster, settings.objective, rate, settings.max_replicas, dict(traffic.shares))
        opts = ctx.options_for(self.name)
        params = {"solver": opts.get("solver", settings.solver), "seed": opts.get("seed", settings.seed),
                  "time_limit_s": opts.get("time_limit_s") or settings.time_limit_s or min(5.0 * cluster.nodes, 45.0),
                  "gap_limit": opts.get("gap", settings.gap)}
        if any(not o for o in inst.options.values()):
            raise PlancError(f"plan: {explain_infeasible(inst, inputs.get('no_layout'))}")
        plan_settings = {"slo": settings.slo.model_dump(), "rate": rate, "prompt_tokens": traffic.prompt_tokens,
                         "output_tokens": traffic.output_tokens, "shares": traffic.shares,
                         "max_replicas": settings.max_replicas}
        name = cluster.name or cluster.device.name
        score = engine_score(name, params, plan_settings) if settings.objective == "throughput" else None
        simulate = bool(opts.get("simulate", settings.simulate)) and settings.objective == "throughput"
        pool: list[Solution] = []
        sol = plan_solve(inst, params["time_limit_s"], params["gap_limit"], params["seed"], params["solver"],
                         opts.get("method", "auto"), score=score, pool=pool if simulate else None)
        if not sol.copies:
            if sol.status in ("infeasible", "infeasible_or_unbounded"):
                raise PlancError(f"plan: {self._why(inst, params)}")
            raise PlancError(f"plan: the solver found no layout within {params['time_limit_s']:g} s "
                             f"({sol.status}); raise plan.time_limit_s")
        program.plan = to_plan(inst, sol, name, params)
        settle(program.plan, plan_settings)
        if simulate:
            program.plan = self._rank_by_simulation(program, inst, program.plan, name, params, plan_settings, pool)
        return True

    def _rank_by_simulation(self, program: Program, inst: Instance, best: Plan, name: str, params: dict,
                            plan_settings: dict, pool: list[Solution]) -> Plan:
        """Re-rank the search's candidates by the simulator's capacity within the SLO: the plan chosen, the
        other placements the search scored (`plan_solve`'s pool) best first by engine capacity, up to
        SIMULATED_CANDIDATES in all, and the greedy packer's."""
        from planc.cost import CostModel
        from planc.passes.greedy import greedy_copies
        from planc.plan_sim import simulated_capacity

        cm = CostModel.for_cluster(inst.cluster, program.base.checkpoint.arch.dtype_bytes)
        others = []
        for sol in pool:
            plan = to_plan(inst, sol, name, params)
            settle(plan, plan_settings)
            others.append(plan)
        others.sort(key=lambda c: -c.predicted["engine_capacity_rps"])
        candidates, seen = [], set()
        for c in [best] + others:
            key = _placement_key(c)
            if key not in seen and len(candidates) < SIMULATED_CANDIDATES:
                seen.add(key)
                candidates.append(c)
        greedy = placement_plan(inst, greedy_copies(inst), name, params, plan_settings, method="greedy")
        if greedy is not None and _placement_key(greedy) not in seen:
            candidates.append(greedy)
        ranked = {}
        for c in candidates:
            c.predicted["simulated_capacity_rps"] = simulated_capacity(program, c, cm)
            label = c.solver["method"] if c is not best else f"{c.solver['method']} (chosen by engine capacity)"
            ranked[label if label not in ranked else f"{label} #{len(ranked) + 1}"] = c.predicted["simulated_capacity_rps"]
        chosen = max(candidates, key=lambda c: c.predicted["simulated_capacity_rps"])
        if chosen is not best:  # the full instance's bound and search, not the candidate's own (restricted) one
            sv = chosen.solver
            sv.update(bound=best.solver["bound"], time_limit_hit=best.solver["time_limit_hit"],
                      seconds=best.solver["seconds"])
            sv["gap"] = relative_gap(sv["objective"], sv["bound"])
            sv["status"] = "optimal" if sv["gap"] <= params["gap_limit"] + 1e-9 else "feasible"
        chosen.solver["ranked_by_simulation"] = ranked
        return chosen

    def _why(self, inst: Instance, params: dict) -> str:
        if inst.objective == "devices":
            best = plan_solve(Instance(inst.groups, inst.options, inst.shares, inst.cluster, "throughput", None,
                                  inst.max_replicas, inst.variant_shares), params["time_limit_s"], params["gap_limit"], params["seed"],
                         params["solver"])
            if best.copies:
                return (f"the cluster serves at most {best.lam:.3g} requests/s within the SLO; plan.rate is "
                        f"{inst.rate:g}: add devices or relax plan.slo")
        return explain_infeasible(inst)
