"""Plan time vs number of variants and devices (issue 4), with the baselines scored in the same run.

Llama-3-70B-shaped base (config.json only, no weights), variants that change the top 8 layers and
the head (3 of every 4) or are rank-16 LoRA adapters (1 of 4), planned on H100-80GB clusters with the
default settings (time limit 5 s per node). Each case runs in a fresh process, so the time includes
everything `planc plan` does after start-up (reading the spec, tracing on meta, costing, solving).

    OMP_NUM_THREADS=1 python benchmarks/plan_scaling.py [--quick] [--out benchmarks/out/plan_scaling.json]
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
CASES = [(4, "8xH100-80GB"), (16, "8xH100-80GB"), (16, "2x8xH100-80GB"), (32, "2x8xH100-80GB"),
         (64, "4x8xH100-80GB")]

_ONE = """
import json, sys, time
t0 = time.perf_counter()
from planc.planner import baselines, plan
t1 = time.perf_counter()
program = plan(sys.argv[1])
t2 = time.perf_counter()
b = baselines(program)
p = program.plan
print(json.dumps({"import_s": t1 - t0, "plan_s": t2 - t1, "groups": len(program.groups),
                  "throughput_rps": p.predicted["throughput_rps"], "devices": p.predicted["devices"],
                  "solver": p.solver, "baselines": b,
                  "pass_seconds": {r.name: r.seconds for r in program.log}}))
"""


def write_spec(root: Path, num_variants: int, cluster: str) -> Path:
    (root / "base").mkdir(parents=True, exist_ok=True)
    (root / "base" / "config.json").write_text(json.dumps(LLAMA70B))
    lines = ["base: {name: base, path: ./base}", "variants:"]
    for i in range(num_variants):
        if i % 4 == 3:
            lines.append(f"  - {{name: lora{i}, lora: {{r: 16}}}}")
        else:
            lines.append(f"  - {{name: ft{i}, changes: [layers.72-79, head]}}")
    lines.append(f"plan: {{cluster: {cluster}, slo: {{tpot_ms: 100, ttft_ms: 3000}}}}")
    spec = root / "model.yaml"
    spec.write_text("\n".join(lines) + "\n")
    return spec


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="only the two cases the issue names")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out/plan_scaling.json"))
    args = ap.parse_args()
    cases = [(16, "8xH100-80GB"), (64, "4x8xH100-80GB")] if args.quick else CASES
    rows = []
    for num_variants, cluster in cases:
        with tempfile.TemporaryDirectory() as tmp:
            spec = write_spec(Path(tmp), num_variants, cluster)
            start = time.perf_counter()
            proc = subprocess.run([sys.executable, "-c", _ONE, str(spec)], capture_output=True, text=True, check=True)
            wall = time.perf_counter() - start
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        r.update(variants=num_variants, cluster=cluster, process_wall_s=wall)
        rows.append(r)
        s = r["solver"]
        print(f"{num_variants:>3} variants {cluster:<15} groups {r['groups']:>3}  plan {r['plan_s']:5.1f} s "
              f"(process {wall:5.1f} s)  {r['throughput_rps']:7.2f} req/s on {r['devices']:>2} dev  "
              f"bound {s['bound']:7.2f} gap {s['gap']:6.1%} [{s['method']}]  greedy "
              f"{r['baselines']['greedy']['throughput_rps']:7.2f}  per-variant "
              f"{r['baselines']['replica_per_variant']['throughput_rps']:.2f}"
              f"{'' if r['baselines']['replica_per_variant']['fits'] else ' (does not fit)'}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
