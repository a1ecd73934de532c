"""Plan time vs number of variants and devices (issue 4), with the baselines scored in the same run.

Llama-3-70B-shaped base (config.json only, no weights), variants that change the top 8 layers and
the head (3 of every 4) or are rank-16 LoRA adapters (1 of 4), planned on H100-80GB clusters with the
default settings (time limit 5 s per node). Each case runs in a fresh process, so the time includes
everything `planc plan` does after start-up (reading the spec, tracing on meta, costing, solving).
The SIMULATED cases also report the simulator's capacity within the SLO (`planc.plan_sim`: one engine
over the plan's stages, one per node on several nodes, as the ray backend runs it) of the plan, of the baselines, and of the plan
with every stage copy moved onto devices of its own (what co-locating groups on shared devices costs
in the simulation), and every deployment's SLO attainment at each of the capacities found (the
capacity search's bracket is a sixteenth of a plan's predicted throughput wide; deployments closer
than that are compared at the same rates).

    OMP_NUM_THREADS=1 python benchmarks/plan_scaling.py [--quick | --simulated | --multi-node | --no-simulation] [--out benchmarks/out/plan_scaling.json]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LLAMA70B = {"model_type": "llama", "vocab_size": 128256, "hidden_size": 8192, "intermediate_size": 28672,
            "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8, "rms_norm_eps": 1e-5,
            "rope_theta": 500000.0, "torch_dtype": "bfloat16", "max_position_embeddings": 8192}
LLAMA3_8B = {**LLAMA70B, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
             "num_attention_heads": 32}
CASES = [("70b", 4, "8xH100-80GB"), ("70b", 16, "8xH100-80GB"), ("70b", 16, "2x8xH100-80GB"),
         ("70b", 32, "2x8xH100-80GB"), ("70b", 64, "4x8xH100-80GB"), ("8b", 8, "8xH100-80GB"),
         ("8b", 32, "8xH100-80GB")]
MULTI_NODE = {("70b", 16, "2x8xH100-80GB"), ("70b", 32, "2x8xH100-80GB"), ("70b", 64, "4x8xH100-80GB")}
SIMULATED = {("70b", 16, "8xH100-80GB"), ("8b", 8, "8xH100-80GB"), ("8b", 32, "8xH100-80GB")} | MULTI_NODE
"""Cases whose plan and baselines are also simulated on planc's runtime (capacity within the SLO)."""

_ONE = """
import json, sys, time
t0 = time.perf_counter()
from planc.planner import baseline_plans, baselines, plan
t1 = time.perf_counter()
simulate = sys.argv[2] == "1"
program = plan(sys.argv[1])
t2 = time.perf_counter()
if simulate:
    from planc.cost import CostModel
    from planc.plan_sim import simulated_capacity
    cm = CostModel.for_cluster(program.extras["plan_inputs"]["cluster"], 2)
    program.plan.predicted["simulated_capacity_rps"] = simulated_capacity(program, program.plan, cm)
    # The same plan with every stage copy on devices of its own: how much the plan's co-location of
    # groups on shared devices costs in the simulation.
    import dataclasses
    own = [dataclasses.replace(q, devices=tuple(range(100 * i, 100 * i + q.tp)))
           for i, q in enumerate(program.plan.placements)]
    program.plan.predicted["simulated_capacity_unshared_rps"] = simulated_capacity(
        program, dataclasses.replace(program.plan, placements=own), cm)
baseline = baseline_plans(program)
b = baselines(program, plans=baseline)
h2h = []
if simulate:
    # the baselines' capacities, then every deployment at each capacity found: the capacity search
    # resolves a sixteenth of a plan's predicted throughput, and plans closer than that are ranked by
    # their SLO attainment at the same rates (the same seeded trials)
    from planc.plan_sim import head_to_head
    plans = {"plan": program.plan, **{k: v for k, v in baseline.items() if v is not None}}
    caps = {"plan": program.plan.predicted["simulated_capacity_rps"]}
    for name, bp in plans.items():
        if name != "plan":
            caps[name] = b[name]["simulated_capacity_rps"] = simulated_capacity(program, bp, cm)
    rates = sorted({c for c in caps.values() if c > 0})
    table = head_to_head(program, plans, cm, rates)
    h2h = [{"rate": r, "capacity_of": [n for n, c in caps.items() if c == r],
            "attainment": {n: table[n][r] for n in plans}} for r in rates]
    # plan >= a baseline: the plan meets the SLO (90% of requests) at the baseline's capacity
    for name in plans:
        if name != "plan" and caps[name] > 0:
            b[name]["plan_meets_at_its_capacity"] = table["plan"][caps[name]] >= 0.9
p = program.plan
print(json.dumps({"head_to_head": h2h, "import_s": t1 - t0, "plan_s": t2 - t1, "groups": len(program.groups),
                  "simulated_capacity_rps": p.predicted.get("simulated_capacity_rps"),
                  "simulated_capacity_unshared_rps": p.predicted.get("simulated_capacity_unshared_rps"),
                  "throughput_rps": p.predicted["throughput_rps"], "devices": p.predicted["devices"],
                  "engine_capacity_rps": p.predicted.get("engine_capacity_rps"),
                  "lanes": p.settings.get("lanes") or p.settings.get("lanes_per_node"),
                  "engines": p.predicted.get("engines"), "routes": p.routes,
                  "solver": p.solver, "baselines": b,
                  "pass_seconds": {r.name: r.seconds for r in program.log}}))
"""


def write_spec(root: Path, model: str, num_variants: int, cluster: str) -> Path:
    config = LLAMA70B if model == "70b" else LLAMA3_8B
    top = config["num_hidden_layers"] - 8
    (root / "base").mkdir(parents=True, exist_ok=True)
    (root / "base" / "config.json").write_text(json.dumps(config))
    lines = ["base: {name: base, path: ./base}", "variants:"]
    for i in range(num_variants):
        if i % 4 == 3:
            lines.append(f"  - {{name: lora{i}, lora: {{r: 16}}}}")
        else:
            lines.append(f"  - {{name: ft{i}, changes: [layers.{top}-{top + 7}, head]}}")
    lines.append(f"plan: {{cluster: {cluster}, slo: {{tpot_ms: 100, ttft_ms: 3000}}}}")
    spec = root / "model.yaml"
    spec.write_text("\n".join(lines) + "\n")
    return spec


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="only the two cases the issue names")
    ap.add_argument("--simulated", action="store_true", help="only the cases that are also simulated (~50 min)")
    ap.add_argument("--multi-node", action="store_true", help="only the multi-node cases, simulated (~10 min)")
    ap.add_argument("--no-simulation", action="store_true", help="plan every case, simulate none (~2 min)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out/plan_scaling.json"))
    args = ap.parse_args()
    cases = [("70b", 16, "8xH100-80GB"), ("70b", 64, "4x8xH100-80GB")] if args.quick else CASES
    if args.simulated:
        cases = [c for c in cases if c in SIMULATED]
    if args.multi_node:
        cases = [c for c in cases if c in MULTI_NODE]
    rows = []
    for model, num_variants, cluster in cases:
        simulate = (model, num_variants, cluster) in SIMULATED and not args.no_simulation
        with tempfile.TemporaryDirectory() as tmp:
            spec = write_spec(Path(tmp), model, num_variants, cluster)
            start = time.perf_counter()
            proc = subprocess.run([sys.executable, "-c", _ONE, str(spec), "1" if simulate else "0"],
                                  capture_output=True, text=True, check=True)
            wall = time.perf_counter() - start
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        r.update(model=model, variants=num_variants, cluster=cluster, process_wall_s=wall)
        rows.append(r)
        s = r["solver"]
        sim = ""
        if simulate:
            sim = (f"\n      simulated capacity: plan {r['simulated_capacity_rps']:.2f} (devices not shared "
                   f"{r['simulated_capacity_unshared_rps']:.2f}), greedy "
                   f"{r['baselines']['greedy'].get('simulated_capacity_rps', 0):.2f}, per-variant "
                   f"{r['baselines']['replica_per_variant'].get('simulated_capacity_rps', 0):.2f} req/s")
        for row in r.get("head_to_head", []):
            sim += (f"\n      at {row['rate']:.2f} req/s (capacity of {', '.join(row['capacity_of'])}): SLO met by "
                    + ", ".join(f"{n} {100 * a:.1f}%" for n, a in row["attainment"].items()))
        print(f"{model:>3} x{num_variants:<3} {cluster:<15} groups {r['groups']:>3}  plan {r['plan_s']:5.1f} s "
              f"(process {wall:5.1f} s)  {r['throughput_rps']:7.2f} req/s (engine {r.get('engine_capacity_rps') or 0:.2f}, "
              f"{r.get('lanes')} lane(s)) on {r['devices']:>2} dev  "
              f"bound {s['bound']:7.2f} gap {s['gap']:6.1%} [{s['method']}]  greedy "
              f"{r['baselines']['greedy']['throughput_rps']:7.2f}  per-variant "
              f"{r['baselines']['replica_per_variant']['throughput_rps']:.2f}"
              f"{'' if r['baselines']['replica_per_variant']['fits'] else ' (does not fit)'}{sim}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
