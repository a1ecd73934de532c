"""Compile scaling (issue 2): time, peak RSS and dedupe ratio of `planc compile` vs number of variants.

Each measurement is planc.load + planc.compile + planc.emit of one model.yaml in a fresh child
process (OMP_NUM_THREADS=1), timed (wall and CPU) end to end right after `import planc`, whose time and
RSS are recorded apart. The inputs are read once, untimed, before each run. The child reports its peak
RSS (getrusage ru_maxrss, checked against /proc/self/status VmHWM) as JSON. Linux keeps ru_maxrss across
fork+exec, so this parent never imports torch: inputs are generated once in another child and cached
under benchmarks/out/inputs/.

Cases:
- tiny: the tiny example's shape (vocab 512, hidden 128, 4 layers, GQA 4/2 heads), N variants where
  variant i is a LoRA adapter (rank 8 on q/v of every layer) when i % 4 == 3, else a partial
  fine-tune (top 2 layers + final norm + lm_head perturbed).
- 100m: Llama-shaped, ~100M params (hidden 768, 12 layers, 12/4 heads, intermediate 2048,
  vocab 16000), N partial fine-tunes (top 2 layers + head).

    OMP_NUM_THREADS=1 python benchmarks/compile_scaling.py [--quick] [--sizes 1,4,16,64] [--repeat 3]
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent / "out"
CACHE = OUT / "inputs"
SHAPES = {
    "tiny": dict(vocab_size=512, hidden_size=128, intermediate_size=352, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2),
    "100m": dict(vocab_size=16000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                 num_attention_heads=12, num_key_value_heads=4),
}
LORA_EVERY = {"tiny": 4, "100m": 0}  # variant i is a LoRA adapter when i % k == k - 1 (0: never)
PHASES = ("load", "trace", "partition", "fingerprint", "dedupe", "emit")
MB = 1e6


def is_lora(model: str, i: int) -> bool:
    k = LORA_EVERY[model]
    return k > 0 and i % k == k - 1


def config(model: str) -> dict:
    from planc.example.checkpoints import hf_config
    return hf_config("llama", **SHAPES[model])


def tokenizer_dir() -> Path:
    """Tokenizer files of the tiny example, written once (write_tiny_example trains for a few seconds)."""
    from planc.example.tiny import write_tiny_example
    from planc.models.tokenizer import TOKENIZER_FILES
    d = CACHE / "tokenizer"
    if not (d / "tokenizer.json").is_file():
        with tempfile.TemporaryDirectory() as tmp:
            write_tiny_example(Path(tmp))
            d.mkdir(parents=True, exist_ok=True)
            for name in TOKENIZER_FILES:
                src = Path(tmp) / "models" / "base" / name
                if src.is_file():
                    shutil.copyfile(src, d / name)
    return d


def names(n: int) -> list[str]:
    return ["base"] + [f"v{i:03d}" for i in range(n)]


def model_root(model: str) -> Path:
    tag = hashlib.sha256(json.dumps(SHAPES[model], sort_keys=True).encode()).hexdigest()[:8]
    return CACHE / f"{model}-{tag}"


def ensure_inputs(model: str, n: int) -> Path:
    """Write (once) the base and variants 0..n-1 of `model`; a `.done` marker guards partial writes."""
    from planc.example.checkpoints import perturb, random_state, top_layers, write_adapter, write_checkpoint
    cfg, root = config(model), model_root(model)
    state = None
    for name in (x for x in names(n) if not (root / x / ".done").is_file()):
        d = root / name
        shutil.rmtree(d, ignore_errors=True)
        print(f"  generating {model}/{name}", file=sys.stderr, flush=True)
        if name != "base" and is_lora(model, int(name[1:])):
            write_adapter(d, cfg, targets=("q_proj", "v_proj"), rank=8, alpha=16.0, seed=1000 + int(name[1:]))
        else:
            state = state if state is not None else random_state(cfg, seed=0)
            if name == "base":
                write_checkpoint(d, cfg, state, tokenizer_from=tokenizer_dir())
            else:
                top = top_layers(cfg["num_hidden_layers"], 2)
                write_checkpoint(d, {**cfg, "_name_or_path": name}, perturb(state, top, seed=1 + int(name[1:])))
        (d / ".done").write_text("")
    return root


def write_spec(model: str, n: int) -> Path:
    """model.yaml for the base + n variants, generating missing inputs in a child (keeps torch out of here)."""
    root = model_root(model)
    if not all((root / x / ".done").is_file() for x in names(n)):
        subprocess.run([sys.executable, __file__, "--generate", model, str(n)], check=True)
    variants = [{"name": f"v{i:03d}", ("adapter" if is_lora(model, i) else "path"): f"./v{i:03d}"}
                for i in range(n)]
    spec = root / f"model-{n}.yaml"
    spec.write_text(json.dumps({"base": {"name": "base", "path": "./base"}, "variants": variants,
                                "backend": "local"}, indent=1) + "\n")  # JSON is YAML
    return spec


def input_files(model: str, n: int) -> list[Path]:
    return [f for x in names(n) for f in sorted((model_root(model) / x).glob("*.safetensors"))]


def warm_cache(files: list[Path]) -> None:
    """Read the inputs once, untimed: a run measures planc, not a disk read after page-cache reclaim."""
    buf = bytearray(8 << 20)
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass


def maxrss_mb() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MB  # Linux: KiB


def vmhwm_mb() -> float:
    """Peak RSS of this address space (reset by exec, unlike ru_maxrss)."""
    line = next(ln for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith("VmHWM"))
    return int(line.split()[1]) * 1024 / MB


def child(spec: str, out: str) -> None:
    """One measured compile (load + compile + emit, right after `import planc`); prints one JSON line."""
    ti = time.perf_counter()
    import planc
    t0, c0 = time.perf_counter(), time.process_time()
    rss_import = maxrss_mb()
    program = planc.load(spec)
    t1 = time.perf_counter()
    program = planc.compile(program)
    t2 = time.perf_counter()
    planc.emit(program, out=out)
    t3 = time.perf_counter()
    totals = json.loads((Path(out) / "manifest.json").read_text())["totals"]
    phases = {"load": t1 - t0, **{r.name: r.seconds for r in program.log}, "emit": t3 - t2}
    params = sum(math.prod(t.shape) for t in program.base.checkpoint.tensors.values())
    print(json.dumps({"seconds": t3 - t0, "cpu_s": time.process_time() - c0, "import_s": t0 - ti,
                      "rss_after_import_mb": rss_import, "peak_rss_mb": maxrss_mb(), "vmhwm_mb": vmhwm_mb(),
                      "phases": phases, "totals": totals, "params": params, "unique_blocks": len(program.zoo),
                      "unique_adapters": len(program.adapter_zoo), "dynamo_imported": "torch._dynamo" in sys.modules}))


def measure(spec: Path, files: list[Path], repeat: int) -> dict:
    """Run the child `repeat` times; keep the median-time run, the max peak RSS and all times."""
    runs, bundle, env = [], OUT / "bundle-scratch", {**os.environ, "OMP_NUM_THREADS": "1"}
    for _ in range(repeat):
        warm_cache(files)
        shutil.rmtree(bundle, ignore_errors=True)
        proc = subprocess.run([sys.executable, __file__, "--child", str(spec), str(bundle)],
                              env=env, capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"compile of {spec} failed:\n{proc.stderr}")
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        shutil.rmtree(bundle, ignore_errors=True)
    runs.sort(key=lambda r: r["seconds"])
    best = dict(runs[len(runs) // 2])
    best.update({f"all_{k}": [r[k] for r in runs] for k in ("seconds", "cpu_s", "import_s")})
    best.update({k: max(r[k] for r in runs) for k in ("peak_rss_mb", "vmhwm_mb", "dynamo_imported")})
    best["parent_maxrss_mb"] = maxrss_mb()  # the floor ru_maxrss inherits; must stay well below the child's
    return best


def machine() -> dict:
    from importlib.metadata import version
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    return {"cpu": cpu, "nproc": os.cpu_count(), "python": platform.python_version(), "torch": version("torch"),
            "platform": platform.platform(),
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}


def run_case(model: str, n: int, repeat: int) -> dict:
    spec = write_spec(model, n)
    print(f"measuring {model} x{n} ({repeat} run(s))", file=sys.stderr, flush=True)
    load, files = os.getloadavg()[0], input_files(model, n)  # load: other work inflates wall time
    r = measure(spec, files, repeat)
    n_lora = sum(is_lora(model, i) for i in range(n))
    return {"model": model, "variants": n, "partial": n - n_lora, "lora": n_lora,
            "input_bytes": sum(f.stat().st_size for f in files), "loadavg": [load, os.getloadavg()[0]], **r}


def add_ratios(results: list[dict]) -> None:
    """Within each model's series: ratio = t(N)/t(1)/N (1.0 = linear with no fixed cost) and
    marginal = (t(N) - t(1)) / (N - 1), seconds per extra variant (flat = linear)."""
    for r in results:
        one = next((x for x in results if x["model"] == r["model"] and x["variants"] == 1), None)
        n = r["variants"]
        r["per_variant_ratio"] = r["seconds"] / one["seconds"] / n if one else None
        r["marginal_s"] = (r["seconds"] - one["seconds"]) / (n - 1) if one and n > 1 else None


def print_tables(results: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table
    t = Table(title="planc compile scaling (median-time run; RSS = max over runs; dedupe = logical/stored)")
    for col in ("model", "variants (part+lora)", "input MB", "compile s", "CPU s", "import s", "t(N)/t(1)/N",
                "marginal s/var", "peak RSS MB", "VmHWM MB", "RSS@import MB", "logical MB", "stored MB",
                "unique MB", "dedupe"):
        t.add_column(col, justify="right")
    for r in results:
        tot, ratio, marg = r["totals"], r["per_variant_ratio"], r["marginal_s"]
        t.add_row(f"{r['model']} ({r['params'] / 1e6:.1f}M)", f"{r['variants']} ({r['partial']}+{r['lora']})",
                  f"{r['input_bytes'] / MB:.0f}", f"{r['seconds']:.2f}", f"{r['cpu_s']:.2f}", f"{r['import_s']:.2f}",
                  "-" if ratio is None else f"{ratio:.2f}", "-" if marg is None else f"{marg:.3f}",
                  f"{r['peak_rss_mb']:.0f}", f"{r['vmhwm_mb']:.0f}", f"{r['rss_after_import_mb']:.0f}",
                  f"{tot['logical_bytes'] / MB:.1f}", f"{tot['stored_bytes'] / MB:.1f}",
                  f"{tot['unique_param_bytes'] / MB:.1f}", f"{tot['dedupe_ratio']:.2f}")
    p = Table(title="phase seconds (median run)")
    for col in ("model", "variants", *PHASES):
        p.add_column(col, justify="right")
    for r in results:
        p.add_row(r["model"], str(r["variants"]), *(f"{r['phases'].get(k, 0.0):.2f}" for k in PHASES))
    for table in (t, p):
        Console(width=200).print(table)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny with 1/4/16 variants only; skip 100m")
    ap.add_argument("--sizes", default="1,4,16,64", help="variant counts of the tiny model")
    ap.add_argument("--big-sizes", default="1,16", help="variant counts of the 100m model ('' to skip)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per tiny case (median time)")
    ap.add_argument("--big-repeat", type=int, default=3, help="runs per 100m case")
    ap.add_argument("--out", type=Path, default=OUT / "compile_scaling.json")
    ap.add_argument("--child", nargs=2, metavar=("SPEC", "BUNDLE"), help=argparse.SUPPRESS)
    ap.add_argument("--generate", nargs=2, metavar=("MODEL", "N"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(*args.child)
    if args.generate:
        ensure_inputs(args.generate[0], int(args.generate[1]))
        return
    sizes = [int(s) for s in args.sizes.split(",") if s]
    big = [int(s) for s in args.big_sizes.split(",") if s]
    if args.quick:
        sizes, big = [s for s in sizes if s <= 16], []
    results = [run_case("tiny", n, args.repeat) for n in sizes]
    results += [run_case("100m", n, args.big_repeat) for n in big]
    add_ratios(results)
    print_tables(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine(), "argv": sys.argv[1:],
                                    "omp_num_threads": "1", "results": results}, indent=2) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
