"""Multi-node plans under skewed traffic: one popular variant split over nodes, or kept whole on one node.

The spec is plan_scaling's (Llama-3-70B or 8B shape, fine-tunes of the top 8 layers and head, and LoRA
adapters), with a workload file whose variant mix gives `ft0` `--hot` times the weight of every other
variant. Two plans in fresh processes:

- **split**: the planner as it is (`greedy.assign_variants` may split a popular variant over nodes; of
  that plan and the whole-variant one it keeps the one with the higher engine capacity);
- **whole**: the same planner with splitting turned off (`greedy.BALANCE_TOLERANCE` raised so no
  node counts as overloaded): every variant whole on one node, as before the split existed.

Each reports the MIP's figure, the engine capacity, `ft0`'s routes, and the simulated capacity
within the SLO (`planc.plan_sim`: one engine per node with the router's split); the split run also
scores the greedy baseline (which packs node by node over the same split).

    OMP_NUM_THREADS=1 python benchmarks/plan_skew.py [--model 70b --variants 16 --cluster 4x8xH100-80GB --hot 20]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from plan_scaling import write_spec  # noqa: E402

_ONE = """
import json, sys, time
import planc.passes.greedy as greedy
from planc.cost import CostModel
from planc.plan_sim import simulated_capacity
from planc.planner import baseline_plans, baselines, plan
spec, mode = sys.argv[1], sys.argv[2]
if mode == "whole":
    greedy.BALANCE_TOLERANCE = 1e9  # no node counts as overloaded: nothing is split
t = time.perf_counter()
program = plan(spec)
plan_s = time.perf_counter() - t
p = program.plan
cm = CostModel.for_cluster(program.extras["plan_inputs"]["cluster"], 2)
t = time.perf_counter()
out = {"mode": mode, "plan_s": plan_s, "method": p.solver["method"], "mip_rps": p.predicted["throughput_rps"],
       "engine_rps": p.predicted.get("engine_capacity_rps"), "engines": p.predicted.get("engines"),
       "hot_routes": p.routes.get("ft0"), "simulated_rps": simulated_capacity(program, p, cm)}
out["sim_s"] = time.perf_counter() - t
if mode == "split":
    greedy_plan = baseline_plans(program).get("greedy")
    scored = baselines(program, plans={"greedy": greedy_plan})
    out["greedy_engine_rps"] = scored["greedy"].get("engine_capacity_rps")
    out["greedy_simulated_rps"] = simulated_capacity(program, greedy_plan, cm) if greedy_plan else None
print(json.dumps(out))
"""


def write_skewed_spec(root: Path, model: str, num_variants: int, cluster: str, hot: float) -> Path:
    spec = write_spec(root, model, num_variants, cluster)
    names = ["base"] + [f"lora{i}" if i % 4 == 3 else f"ft{i}" for i in range(num_variants)]
    weights = {v: hot if v == "ft0" else 1.0 for v in names}
    (root / "traffic.yaml").write_text(
        "kind: gamma\nrate: 10\ncv: 1\nnum_requests: 400\nprompt_tokens: {dist: fixed, value: 512}\n"
        f"output_tokens: {{dist: fixed, value: 256}}\nvariants: {json.dumps(weights)}\n")
    spec.write_text(spec.read_text().replace("plan: {cluster", "plan: {workload: traffic.yaml, cluster"))
    return spec


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="70b", choices=["70b", "8b"])
    ap.add_argument("--variants", type=int, default=16)
    ap.add_argument("--cluster", default="4x8xH100-80GB")
    ap.add_argument("--hot", type=float, default=20.0, help="ft0's weight in the mix; every other variant has 1")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out/plan_skew.json"))
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        spec = write_skewed_spec(Path(tmp), args.model, args.variants, args.cluster, args.hot)
        for mode in ("split", "whole"):
            proc = subprocess.run([sys.executable, "-c", _ONE, str(spec), mode], capture_output=True, text=True,
                                  check=True)
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    share = args.hot / (args.hot + args.variants)
    print(f"{args.model} x{args.variants} on {args.cluster}, ft0 weight {args.hot:g} (~{share:.0%} of requests)")
    print(f"{'plan':<6} {'method':<28} {'time s':>7} {'MIP':>8} {'engine':>8} {'simulated':>10}  ft0 routes")
    for r in rows:
        routes = ", ".join(f"{k}: {v:.2f}" for k, v in sorted((r["hot_routes"] or {}).items()))
        print(f"{r['mode']:<6} {r['method']:<28} {r['plan_s']:7.1f} {r['mip_rps']:8.2f} {r['engine_rps']:8.2f} "
              f"{r['simulated_rps']:10.2f}  {routes}")
    g = rows[0]
    print(f"greedy (node by node, same split): engine {g['greedy_engine_rps'] or 0:.2f}, simulated "
          f"{g['greedy_simulated_rps'] or 0:.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
