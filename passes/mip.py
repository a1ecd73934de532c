"""The MIPs of the parallelize pass (OR-Tools math_opt): exact slot-level model and node-level relaxation.

Variables (g: group, o: one of its options from the cost pass, p: a stage of o, s: an aligned slot
of tp(o) devices inside one node):
- ``n[g,o,p,s]`` integer: copies of stage p placed on slot s;
- ``r[g,o,k]`` integer: replicas of (g, o) on node k; every stage has exactly that many copies there,
  so a replica never spans nodes;
- ``y[g,o] >= 0``: requests/s the group serves with option o; ``z[g,o,p,s] >= 0`` the part of it
  through the copies on slot s (at most their capacity);
- ``u[d]`` binary: device d is used; ``lam``: the throughput scale.
Constraints: each group serves its users' share of the traffic (``sum_o y = lam * share``);
per device, memory of the copies it holds <= usable memory * u[d], and device time
``sum z * tau + n * busy <= 1`` (co-located stages share the device; every copy streams its
weights at each step whatever its load, and each request adds its own work); every group has 1..max_replicas replicas;
a group runs on a node only if each group feeding it does (a chain stays on a node). On several
nodes each node runs its own engine: ``x[v,k] >= 0`` is the part of variant v's traffic that node
k's engine serves (``sum_k x = lam * share``), and on each node a group carries exactly its users'
traffic there, so a request's chain never leaves its node (`route_variants`).
Objective ``throughput``: maximise lam (ties: fewer devices); ``devices``: fewest devices for
``lam = rate``. Used devices are packed to the front of each node and nodes to the front of the
cluster, which removes symmetric copies of every solution without losing any.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Optional

from ortools.math_opt.python import mathopt

from planc.cluster import Cluster
from planc.plan import BlockGroup
from planc.passes.cost import GroupOption

DEVICE_TIE_BREAK = 1e-6
"""Requests/s the throughput objective gives up per device used: prefers fewer devices among equals."""

WORK_PER_SECOND = 6e5
"""Search effort that one second of `plan.time_limit_s` buys, in branch-and-bound nodes times the
model's nonzeros (each node re-solves an LP, whose cost grows with the model's size). A search stops
on the node limit this gives, which the solver (single-threaded, seeded) reproduces exactly, so a
plan is the same on every run and every machine; the wall clock only backs it up. Measured with
this machine's SCIP on the node-level model of 8B x 32 variants (7534 nonzeros), the slowest
instance per node of the benchmark's: 1.1-1.7 M node-nonzeros per second."""
MIN_NODES = 50
"""Fewest branch-and-bound nodes a search gets, however small its effort."""
ROOT_NODES = 70
"""What a search costs before its first branch (presolve, the root LP), in nodes of the same model:
measured 0.5 s, about 70 nodes' time, on the 8B x 32 node-level model."""


def node_limit(model: mathopt.Model, effort_s: float) -> int:
    """Branch-and-bound nodes worth `effort_s` seconds of `WORK_PER_SECOND` on `model`."""
    nonzeros = sum(1 for _ in model.linear_constraint_matrix_entries())
    return max(MIN_NODES, int(WORK_PER_SECOND * effort_s / max(nonzeros, 1)))


@dataclass
class Instance:
    """Everything the MIP reads."""

    groups: list[BlockGroup]
    options: dict[str, list[GroupOption]]
    shares: dict[str, float]
    """Group id -> share of all requests that run through it."""
    cluster: Cluster
    objective: str = "throughput"
    rate: Optional[float] = None
    max_replicas: int = 8
    variant_shares: dict[str, float] = field(default_factory=dict)
    """Variant -> share of all requests (what `shares` was summed from)."""


@dataclass
class Solution:
    status: str
    objective: float
    bound: float
    seconds: float
    lam: float
    copies: dict[tuple, int] = field(default_factory=dict)
    """(group, option index, stage, slot index) -> copies."""
    load: dict[tuple, float] = field(default_factory=dict)
    """(group, option index, stage, slot index) -> requests/s through those copies."""
    used: list[int] = field(default_factory=list)
    routes: dict[tuple, float] = field(default_factory=dict)
    """(variant, node) -> requests/s of that variant that node's engine serves."""
    method: str = "exact"
    time_limit_hit: bool = False
    """The wall-clock backstop stopped the search before its node limit: another run may differ."""

    @property
    def gap(self) -> float:
        return relative_gap(self.objective, self.bound)


def relative_gap(objective: float, bound: float) -> float:
    """|bound - objective| / |objective|; 0 when they are equal, inf for an infinite bound or a zero objective."""
    if not math.isfinite(bound) or objective == 0:
        return 0.0 if bound == objective else float("inf")
    return abs(bound - objective) / max(abs(objective), 1e-12)


def slots(cluster: Cluster, tp: int) -> list[tuple[int, tuple[int, ...]]]:
    """Aligned groups of `tp` devices inside each node: (node, device ids)."""
    per = cluster.devices_per_node
    return [(node, tuple(range(node * per + j, node * per + j + tp)))
            for node in range(cluster.nodes) for j in range(0, per - tp + 1, tp)]


def group_shares(groups: list[BlockGroup], variant_shares: dict[str, float]) -> dict[str, float]:
    return {g.id: sum(variant_shares.get(v, 0.0) for v in g.users) for g in groups}


def _throughput_variable(m: mathopt.Model, inst: Instance) -> mathopt.Variable:
    """lam, the requests/s every group serves its share of; fixed to the rate for objective `devices`."""
    cap_total = sum(max((o.cap_rps for o in opts), default=0.0) * inst.max_replicas for opts in inst.options.values())
    lam = m.add_variable(lb=0.0, ub=max(cap_total, 1e-9), name="lam")
    if inst.objective == "devices":
        m.add_linear_constraint(lam == inst.rate)
    return lam


def _serve_group(m: mathopt.Model, inst: Instance, gid: str, loads: list, replicas: list,
                 lam: mathopt.Variable) -> None:
    """A group carries its share of the traffic on 1..max_replicas replicas (every chain is served)."""
    m.add_linear_constraint(sum(loads) == inst.shares[gid] * lam)
    m.add_linear_constraint(sum(replicas) >= 1)
    m.add_linear_constraint(sum(replicas) <= inst.max_replicas)


def per_node_engines(inst: Instance) -> bool:
    """Each node runs its own engine over its own copies (several nodes, known traffic shares)."""
    return inst.cluster.nodes > 1 and bool(inst.variant_shares)


def route_variants(m: mathopt.Model, inst: Instance, node_loads: dict[str, dict[int, list]],
                   lam: mathopt.Variable) -> dict[tuple, mathopt.Variable]:
    """Per-node engines: variant v's traffic splits over the nodes (``x[v,k]``, the part node k's engine
    serves); on each node a group carries what its users send there (`node_loads`: group -> node ->
    its load terms on that node), so every copy a request passes is on one node."""
    nodes = range(inst.cluster.nodes)
    x = {(v, k): m.add_variable(lb=0.0, name=f"x_{v}_{k}") for v in inst.variant_shares for k in nodes}
    for v, share in inst.variant_shares.items():
        m.add_linear_constraint(sum(x[(v, k)] for k in nodes) == share * lam)
    for g in inst.groups:
        users = [v for v in g.users if v in inst.variant_shares]
        for k in nodes:
            m.add_linear_constraint(sum(node_loads.get(g.id, {}).get(k, [])) == sum(x[(v, k)] for v in users))
    return x


def single_node_routes(inst: Instance, lam: float) -> dict[tuple, float]:
    return {(v, 0): share * lam for v, share in inst.variant_shares.items()}


def _chain_locality(m: mathopt.Model, inst: Instance, hosts: dict[str, list]) -> None:
    """A group runs on a node only if every group feeding it does: a chain never leaves its node."""
    for g in inst.groups:
        for pred in g.predecessors:
            for k in range(inst.cluster.nodes):
                m.add_linear_constraint(hosts[g.id][k] <= hosts[pred][k])


class _Builder:
    def __init__(self, inst: Instance):
        self.inst = inst
        self.model = mathopt.Model(name="planc-parallelize")
        self.n: dict[tuple, mathopt.Variable] = {}
        self.z: dict[tuple, mathopt.Variable] = {}
        self.slot_of: dict[tuple, tuple[int, tuple[int, ...]]] = {}
        self.r: dict[tuple, mathopt.Variable] = {}
        self.hosts: dict[str, list[mathopt.Variable]] = {}

    def build(self) -> None:
        inst, m = self.inst, self.model
        cluster = inst.cluster
        self.u = [m.add_binary_variable(name=f"u{d}") for d in range(cluster.num_devices)]
        self.lam = _throughput_variable(m, inst)
        device_mem = {d: [] for d in range(cluster.num_devices)}
        device_time = {d: [] for d in range(cluster.num_devices)}
        hosts = {}
        flows = per_node_engines(inst)
        node_loads: dict[str, dict[int, list]] = {}
        for g in inst.groups:
            replicas_total = []
            y_terms = []
            host = [m.add_binary_variable(name=f"h_{g.id}_{k}") for k in range(cluster.nodes)]
            hosts[g.id] = host
            self.hosts[g.id] = host
            on_node = node_loads.setdefault(g.id, {})
            for oi, opt in enumerate(inst.options[g.id]):
                y = m.add_variable(lb=0.0, name=f"y_{g.id}_{oi}")
                y_terms.append(y)
                r = [m.add_integer_variable(lb=0, ub=inst.max_replicas, name=f"r_{g.id}_{oi}_{k}")
                     for k in range(cluster.nodes)]
                replicas_total.extend(r)
                for k in range(cluster.nodes):
                    self.r[(g.id, oi, k)] = r[k]
                for k in range(cluster.nodes):
                    m.add_linear_constraint(r[k] <= inst.max_replicas * host[k])
                if flows:
                    y_node = {k: m.add_variable(lb=0.0, name=f"yk_{g.id}_{oi}_{k}") for k in range(cluster.nodes)}
                    for k in range(cluster.nodes):
                        on_node.setdefault(k, []).append(y_node[k])
                for p in range(opt.pp):
                    per_node = {k: [] for k in range(cluster.nodes)}
                    z_node = {k: [] for k in range(cluster.nodes)}
                    z_terms = []
                    for si, (node, devices) in enumerate(slots(cluster, opt.tp)):
                        key = (g.id, oi, p, si)
                        n = m.add_integer_variable(lb=0, ub=inst.max_replicas, name=f"n_{g.id}_{oi}_{p}_{si}")
                        z = m.add_variable(lb=0.0, name=f"z_{g.id}_{oi}_{p}_{si}")
                        self.n[key], self.z[key], self.slot_of[key] = n, z, (node, devices)
                        m.add_linear_constraint(z <= opt.cap_rps * n)
                        per_node[node].append(n)
                        z_node[node].append(z)
                        z_terms.append(z)
                        for d in devices:
                            device_mem[d].append(opt.memory[p] * n)
                            device_time[d].append(opt.tau[p] * z + opt.busy(p) * n)
                    for k in range(cluster.nodes):
                        m.add_linear_constraint(sum(per_node[k]) == r[k])
                        if flows:  # a replica's stages are on one node: each carries the node's load
                            m.add_linear_constraint(sum(z_node[k]) == y_node[k])
                    m.add_linear_constraint(sum(z_terms) == y)
            _serve_group(m, inst, g.id, y_terms, replicas_total, self.lam)
        _chain_locality(m, inst, hosts)
        self.x = route_variants(m, inst, node_loads, self.lam) if flows else {}
        usable = cluster.device.usable_bytes
        for d in range(cluster.num_devices):
            # scaled to GB so the solver's tolerances see numbers near 1
            m.add_linear_constraint(sum(t / 1e9 for t in device_mem[d]) <= usable / 1e9 * self.u[d])
            m.add_linear_constraint(sum(device_time[d]) <= self.u[d])
        self._break_symmetry()
        if inst.objective == "devices":
            m.minimize(sum(self.u))
        else:
            m.maximize(self.lam - DEVICE_TIE_BREAK * sum(self.u))

    def integer_values(self, copies: dict[tuple, int]) -> dict[mathopt.Variable, float]:
        """Every integer variable's value for a placement given as stage copies."""
        values = {v: float(copies.get(k, 0)) for k, v in self.n.items()}
        replicas: dict[tuple, int] = {}
        for (gid, oi, p, si), count in copies.items():
            if p == 0:
                node = self.slot_of[(gid, oi, p, si)][0]
                replicas[(gid, oi, node)] = replicas.get((gid, oi, node), 0) + count
        values.update({v: float(replicas.get(k, 0)) for k, v in self.r.items()})
        for gid, host in self.hosts.items():
            for k, h in enumerate(host):
                values[h] = float(any(c and key[0] == gid and key[2] == k for key, c in replicas.items()))
        used = {d for key, c in copies.items() if c for d in self.slot_of[key][1]}
        values.update({u: float(d in used) for d, u in enumerate(self.u)})
        return values

    def _break_symmetry(self) -> None:
        cluster, m = self.inst.cluster, self.model
        per = cluster.devices_per_node
        for k in range(cluster.nodes):
            for j in range(per - 1):
                m.add_linear_constraint(self.u[k * per + j] >= self.u[k * per + j + 1])
            if k + 1 < cluster.nodes:
                m.add_linear_constraint(self.u[k * per] >= self.u[(k + 1) * per])


_SOLVERS = {"scip": mathopt.SolverType.GSCIP, "highs": mathopt.SolverType.HIGHS}


def solve(inst: Instance, time_limit_s: float = 10.0, gap: float = 0.01, seed: int = 0,
          solver: str = "scip", hint: Optional[dict[tuple, int]] = None,
          fixed: Optional[dict[tuple, int]] = None, replicas: Optional[dict[tuple, int]] = None,
          effort_s: Optional[float] = None) -> Solution:
    """Build and solve the MIP. Deterministic for a seed (single-threaded solver) unless `time_limit_s`
    (the wall clock) stops it before the node limit worth `effort_s` does (then `time_limit_hit`).

    `hint`: a placement (stage copies) to start from; `fixed`: evaluate exactly that placement (the
    integer variables are fixed, leaving the LP that routes the traffic); `replicas`: fix how many
    replicas of each (group, option, node) there are and search only where their stages go.
    """
    if fixed is not None:
        return evaluate(inst, fixed)
    b = _Builder(inst)
    b.build()
    model_params = mathopt.ModelSolveParameters()
    if replicas is not None:
        for key, var in b.r.items():
            var.lower_bound = var.upper_bound = float(replicas.get(key, 0))
        for key, var in b.n.items():
            if not any(replicas.get((key[0], key[1], k), 0) for k in range(inst.cluster.nodes)):
                var.upper_bound = 0.0
    if hint is not None:
        model_params = mathopt.ModelSolveParameters(
            solution_hints=[mathopt.SolutionHint(variable_values=b.integer_values(hint))])
    params = mathopt.SolveParameters(time_limit=timedelta(seconds=time_limit_s), relative_gap_tolerance=gap,
                                     random_seed=seed, threads=1, enable_output=False,
                                     node_limit=None if effort_s is None else node_limit(b.model, effort_s))
    start = time.perf_counter()
    result = mathopt.solve(b.model, _SOLVERS[solver], params=params, model_params=model_params)
    seconds = time.perf_counter() - start
    reason = result.termination.reason
    timed_out = result.termination.limit == mathopt.Limit.TIME
    if not result.has_primal_feasible_solution():
        return Solution(status=reason.name.lower(), objective=float("nan"), bound=float("nan"), seconds=seconds,
                        lam=0.0, time_limit_hit=timed_out)
    values = result.variable_values()
    copies = {k: int(round(values[v])) for k, v in b.n.items() if values[v] > 0.5}
    load = {k: values[b.z[k]] for k in copies}
    used = [d for d, u in enumerate(b.u) if values[u] > 0.5]
    bound = result.termination.objective_bounds.dual_bound
    routes = ({k: values[x] for k, x in b.x.items()} if b.x else single_node_routes(inst, values[b.lam]))
    return Solution(status=reason.name.lower(), objective=result.objective_value(), bound=bound,
                    seconds=seconds, lam=values[b.lam], copies=copies, load=load, used=used, routes=routes,
                    time_limit_hit=timed_out)


def evaluate(inst: Instance, copies: dict[tuple, int]) -> Solution:
    """The exact model with every integer fixed to the placement `copies`: the LP that routes the
    traffic over them, built over the placed copies only (a placement that breaks a constraint of the
    model, memory, replicas, one node per replica or chain locality, is `infeasible`)."""
    start = time.perf_counter()
    cluster = inst.cluster

    def infeasible() -> Solution:
        return Solution(status="infeasible", objective=float("nan"), bound=float("nan"),
                        seconds=time.perf_counter() - start, lam=0.0)

    m = mathopt.Model(name="planc-placement")
    lam = _throughput_variable(m, inst)
    memory = [0.0] * cluster.num_devices
    fixed_time = [0.0] * cluster.num_devices
    load_time: dict[int, list] = {}
    z: dict[tuple, mathopt.Variable] = {}
    per_stage: dict[tuple, dict[int, list]] = {}
    """(group, option, node) -> stage -> load terms."""
    counts: dict[tuple, list[int]] = {}
    for key, count in sorted(copies.items()):
        if count <= 0:
            continue
        gid, oi, p, si = key
        opt = inst.options[gid][oi]
        node, devices = slots(cluster, opt.tp)[si]
        z[key] = m.add_variable(lb=0.0, ub=opt.cap_rps * count)
        per_stage.setdefault((gid, oi, node), {}).setdefault(p, []).append(z[key])
        counts.setdefault((gid, oi, node), [0] * opt.pp)[p] += count
        for d in devices:
            memory[d] += opt.memory[p] * count
            fixed_time[d] += opt.busy(p) * count
            load_time.setdefault(d, []).append(opt.tau[p] * z[key])
    hosts: dict[str, set[int]] = {g.id: set() for g in inst.groups}
    replicas = {g.id: 0 for g in inst.groups}
    for (gid, oi, node), stages in counts.items():
        if len(set(stages)) > 1:
            return infeasible()  # a replica's stages all sit on one node
        hosts[gid].add(node)
        replicas[gid] += stages[0]
    if any(not 1 <= r <= inst.max_replicas for r in replicas.values()):
        return infeasible()
    if any(not hosts[g.id] <= hosts[pred] for g in inst.groups for pred in g.predecessors):
        return infeasible()
    if any(mem > cluster.device.usable_bytes * (1 + 1e-9) for mem in memory):
        return infeasible()
    if any(t > 1.0 for t in fixed_time):
        return infeasible()
    node_loads: dict[str, dict[int, list]] = {}
    for g in inst.groups:
        ys = []
        for (gid, oi, node), stages in per_stage.items():
            if gid == g.id:
                first = sum(stages[0])
                for p in range(1, inst.options[gid][oi].pp):  # a replica's stages carry the same load
                    m.add_linear_constraint(sum(stages[p]) == first)
                ys.append(first)
                node_loads.setdefault(gid, {}).setdefault(node, []).append(first)
        m.add_linear_constraint(sum(ys) == inst.shares[g.id] * lam)
    x = route_variants(m, inst, node_loads, lam) if per_node_engines(inst) else {}
    for d, terms in load_time.items():
        m.add_linear_constraint(sum(terms) <= 1.0 - fixed_time[d])
    used = sorted(load_time)
    m.maximize(lam)  # (objective `devices` fixes lam to the rate: then any feasible routing)
    result = mathopt.solve(m, mathopt.SolverType.GLOP)
    if result.termination.reason != mathopt.TerminationReason.OPTIMAL:
        return infeasible()
    values = result.variable_values()
    objective = float(len(used)) if inst.objective == "devices" else values[lam] - DEVICE_TIE_BREAK * len(used)
    routes = {k: values[v] for k, v in x.items()} if x else single_node_routes(inst, values[lam])
    return Solution(status="optimal", objective=objective, bound=objective, seconds=time.perf_counter() - start,
                    lam=values[lam], copies={k: c for k, c in copies.items() if c > 0},
                    load={k: values[v] for k, v in z.items()}, used=used, routes=routes)


class _NodeBuilder:
    """Node-level relaxation: replicas per node, memory and device time summed over each node.

    Every per-device constraint of the exact model, summed over a node's devices, holds here, so
    its optimum bounds the exact optimum; a placement is then recovered by packing each node.
    """

    def __init__(self, inst: Instance, memory_scale: list[float], floor: Optional[float] = None):
        self.inst = inst
        self.memory_scale = memory_scale
        self.floor = floor
        self.model = mathopt.Model(name="planc-parallelize-nodes")
        self.r: dict[tuple, mathopt.Variable] = {}

    def build(self) -> None:
        inst, m, cluster = self.inst, self.model, self.inst.cluster
        per = cluster.devices_per_node
        self.v = [m.add_integer_variable(lb=0, ub=per, name=f"v{k}") for k in range(cluster.nodes)]
        self.lam = _throughput_variable(m, inst)
        memory = {k: [] for k in range(cluster.nodes)}
        busy = {k: [] for k in range(cluster.nodes)}
        hosts = {}
        node_loads: dict[str, dict[int, list]] = {}
        for g in inst.groups:
            host = [m.add_binary_variable(name=f"h_{g.id}_{k}") for k in range(cluster.nodes)]
            hosts[g.id] = host
            y_terms, replicas = [], []
            on_node = node_loads.setdefault(g.id, {})
            for oi, opt in enumerate(inst.options[g.id]):
                device_bytes = sum(mem * opt.tp for mem in opt.memory) / 1e9
                device_time = sum(t * opt.tp for t in opt.tau)
                copy_time = sum(opt.busy(p) * opt.tp for p in range(opt.pp))
                for k in range(cluster.nodes):
                    r = m.add_integer_variable(lb=0, ub=inst.max_replicas, name=f"r_{g.id}_{oi}_{k}")
                    on = m.add_binary_variable(name=f"a_{g.id}_{oi}_{k}")
                    z = m.add_variable(lb=0.0, name=f"z_{g.id}_{oi}_{k}")
                    self.r[(g.id, oi, k)] = r
                    m.add_linear_constraint(r <= inst.max_replicas * on)
                    m.add_linear_constraint(on <= r)
                    m.add_linear_constraint(self.v[k] >= opt.num_devices * on)
                    m.add_linear_constraint(r <= inst.max_replicas * host[k])
                    m.add_linear_constraint(z <= opt.cap_rps * r)
                    memory[k].append(device_bytes * r)
                    busy[k].append(device_time * z + copy_time * r)
                    y_terms.append(z)
                    replicas.append(r)
                    on_node.setdefault(k, []).append(z)
            _serve_group(m, inst, g.id, y_terms, replicas, self.lam)
        _chain_locality(m, inst, hosts)
        if per_node_engines(inst):
            route_variants(m, inst, node_loads, self.lam)
        usable = cluster.device.usable_bytes / 1e9
        for k in range(cluster.nodes):
            m.add_linear_constraint(sum(memory[k]) <= usable * self.memory_scale[k] * self.v[k])
            m.add_linear_constraint(sum(busy[k]) <= self.v[k])
            if k + 1 < cluster.nodes:
                m.add_linear_constraint(self.v[k] >= self.v[k + 1])
        if inst.objective == "devices":
            if self.floor is not None:
                m.add_linear_constraint(sum(self.v) <= self.floor)
            m.minimize(sum(self.v))
        else:
            if self.floor is not None:
                m.add_linear_constraint(self.lam >= self.floor)
            m.maximize(self.lam - DEVICE_TIE_BREAK * sum(self.v))


@dataclass
class NodeLevelResult:
    replicas: Optional[dict[tuple, int]]
    """(group, option, node) -> replicas; None when no solution was found."""
    bound: float
    status: str
    """`time_limit` when the wall clock stopped the search before its node limit did."""
    lam: float
    """Throughput (requests/s) of the solution."""
    nodes: int
    """Branch-and-bound nodes explored."""


def solve_nodes(inst: Instance, memory_scale: list[float], time_limit_s: float, gap: float, seed: int,
                solver: str, floor: Optional[float] = None, max_nodes: Optional[int] = None) -> NodeLevelResult:
    """Replicas per (group, option, node) from the node-level relaxation, with its dual bound.

    `floor`: only solutions better than that (throughput at least, or devices at most).
    """
    b = _NodeBuilder(inst, memory_scale, floor)
    b.build()
    # measured on the 16-variant 70B instance: SCIP's root cuts cost ~5 s for a bound 1% tighter
    emphasis = dict(cuts=mathopt.Emphasis.OFF, presolve=mathopt.Emphasis.LOW,
                    heuristics=mathopt.Emphasis.LOW) if solver == "scip" else {}
    params = mathopt.SolveParameters(time_limit=timedelta(seconds=max(time_limit_s, 0.1)),
                                     relative_gap_tolerance=gap, random_seed=seed, threads=1,
                                     enable_output=False, node_limit=max_nodes, **emphasis)
    result = mathopt.solve(b.model, _SOLVERS[solver], params=params)
    status = ("time_limit" if result.termination.limit == mathopt.Limit.TIME
              else result.termination.reason.name.lower())
    nodes = result.solve_stats.node_count
    if not result.has_primal_feasible_solution():
        return NodeLevelResult(None, float("nan"), status, 0.0, nodes)
    values = result.variable_values()
    replicas = {k: int(round(values[v])) for k, v in b.r.items() if values[v] > 0.5}
    return NodeLevelResult(replicas, result.termination.objective_bounds.dual_bound, status, values[b.lam], nodes)


def node_level_limit(inst: Instance, effort_s: float) -> int:
    """Branch-and-bound nodes worth `effort_s` seconds on the instance's node-level model."""
    b = _NodeBuilder(inst, [1.0] * inst.cluster.nodes)
    b.build()
    return node_limit(b.model, effort_s)


def relaxation_bound(inst: Instance) -> float:
    """The node-level model's LP relaxation (integrality dropped): a quick, looser valid bound."""
    b = _NodeBuilder(inst, [1.0] * inst.cluster.nodes)
    b.build()
    for var in b.model.variables():
        var.integer = False
    result = mathopt.solve(b.model, mathopt.SolverType.GLOP)
    if result.termination.reason != mathopt.TerminationReason.OPTIMAL:
        return math.inf if inst.objective == "throughput" else 0.0
    return result.objective_value()
