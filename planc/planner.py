"""`planc plan` as a library call, and the baselines a plan is compared with.

>>> import planc.planner as planner
>>> program = planner.plan("examples/tiny/model.yaml", cluster="local")   # doctest: +SKIP
>>> program.plan.predicted["throughput_rps"]                               # doctest: +SKIP
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from planc.api import compile as compile_program, load
from planc.pass_manager import PassContext
from planc.passes import CostPass, ParallelizePass
from planc.passes.cost import OptionBuilder, chain_block_names
from planc.passes.greedy import greedy_copies
from planc.passes.mip import Instance
from planc.passes.parallelize import placement_plan
from planc.plan import Plan, groups_from_instances
from planc.program import Program


def plan(spec_path: str | Path, cluster: Optional[str] = None, workload: Optional[str | Path] = None,
         objective: Optional[str] = None, time_limit_s: Optional[float] = None, seed: Optional[int] = None,
         ctx: Optional[PassContext] = None, simulate: Optional[bool] = None) -> Program:
    """Plan the spec without reading weights (config.json and the variant descriptions only)."""
    program = load(spec_path, weights=False)
    update: dict[str, Any] = {}
    if workload is not None:
        update["workload"] = Path(workload)
    if objective is not None:
        update["objective"] = objective
    if update:
        spec = program.spec.model_copy(update={"plan": program.spec.plan.model_copy(update=update)})
        program.spec = spec
    ctx = ctx or PassContext()
    if cluster is not None:
        ctx.options.setdefault("cost", {})["cluster"] = cluster
    solver_opts = {k: v for k, v in (("time_limit_s", time_limit_s), ("seed", seed), ("simulate", simulate))
                   if v is not None}
    ctx.options.setdefault("parallelize", {}).update(solver_opts)
    return compile_program(program, passes=[CostPass(), ParallelizePass()], ctx=ctx)


def instance_of(program: Program) -> Instance:
    """The MIP instance the parallelize pass solved (rebuilt from the program's annotations)."""
    from planc.passes.mip import group_shares

    inputs = program.extras["plan_inputs"]
    settings = program.spec.plan
    return Instance(program.groups, program.plan_options, group_shares(program.groups, inputs["traffic"].shares),
                    inputs["cluster"], "throughput", None, settings.max_replicas, dict(inputs["traffic"].shares))


def baseline_plans(program: Program) -> dict[str, Optional[Plan]]:
    """The two ways to deploy without planc's planner, as plans over the same cost model and traffic
    (None where one does not fit): a greedy packer over the same block groups, and one full model
    replica per variant (no block sharing; LoRA variants as merged copies)."""
    inst = instance_of(program)
    out = {"greedy": placement_plan(inst, greedy_copies(inst), "baseline", {}, program.plan.settings)}
    names = program.model_names()
    arch = program.base.checkpoint.arch
    blocks = chain_block_names(arch.num_layers)
    groups = groups_from_instances(blocks, {v: [f"{v}:{b}" for b in blocks] for v in names})
    inputs = program.extras["plan_inputs"]
    cluster, traffic = inputs["cluster"], inputs["traffic"]
    builder = OptionBuilder.for_program(program, inputs["costs"], cluster, traffic)
    per_variant = Instance(groups, {g.id: builder.options(g) for g in groups},
                           {g.id: traffic.shares.get(g.users[0], 0.0) for g in groups}, cluster, "throughput",
                           None, 1, {v: traffic.shares.get(v, 0.0) for v in names})
    copies = greedy_copies(per_variant, grow=False) if all(per_variant.options.values()) else None
    out["replica_per_variant"] = placement_plan(per_variant, copies, "baseline", {}, program.plan.settings)
    return out


def baselines(program: Program, simulate: bool = False,
              plans: Optional[dict[str, Optional[Plan]]] = None) -> dict[str, dict[str, Any]]:
    """Throughput (requests/s within the SLO, same cost model and traffic) of the two baselines
    (`plans`, by default `baseline_plans`). With `simulate`, also the simulator's capacity within the
    SLO on planc's runtime (planc.plan_sim)."""
    plans = baseline_plans(program) if plans is None else plans
    out: dict[str, dict[str, Any]] = {}
    for name, plan_ in plans.items():
        out[name] = {"throughput_rps": plan_.predicted["throughput_rps"] if plan_ else 0.0, "fits": plan_ is not None,
                     "engine_capacity_rps": plan_.predicted["engine_capacity_rps"] if plan_ else 0.0}
    if simulate:
        from planc.cost import CostModel
        from planc.plan_sim import simulated_capacity

        cm = CostModel.for_cluster(program.extras["plan_inputs"]["cluster"], program.base.checkpoint.arch.dtype_bytes)
        for name, plan_ in plans.items():
            if plan_ is not None:
                out[name]["simulated_capacity_rps"] = simulated_capacity(program, plan_, cm)
    return out
