"""Triton kernels (issue 7) on a CUDA GPU: correctness, then achieved bandwidth against torch.

For every kernel at serving shapes (batch 1-256 and 2048-token prefill chunks, hidden 4096 and
8192, contexts up to 8k, LoRA batches of 1-32 adapters of mixed ranks) it first checks the Triton
output against the torch reference run in fp32 on the same inputs, then times, in the same process
and on the same inputs:

- triton: planc's kernel with its default (heuristic) config;
- tuned: the same kernel with the Triton config the tune_kernels pass chose for the case's shape
  class, where it chose one: ``--tune`` runs the pass's own problem set
  (``passes.tune_kernels.serving_problems``) and autotuner on this device first and writes the
  table beside the report (kernels_tuned.json); ``--tuned kernels.json`` reads a bundle's instead;
- eager: the torch reference (``planc.kernels.reference``; for LoRA that is the per-adapter loop);
- compile: ``torch.compile`` of the same reference (``--compile headline``: only at the largest
  shape of each op and model, where bandwidth is meaningful; every new shape is a recompile).

Times are device time per call, from a CUDA graph of calls over inputs rotated past the L2
(`graph_ms`); calls that cannot be graphed (the LoRA wrapper's host copies, the decode
reference's sync) are timed with ``triton.testing.do_bench`` medians, launches included.
Achieved bandwidth = the bytes an op must move at least (inputs read once, outputs written once)
/ time, as a fraction of the device's measured copy bandwidth (a large device-to-device
``copy_``, read + write). Targets (issue 7): rms_norm, silu_mul and decode_attention at >= 70% of
copy bandwidth; lora_delta faster than the per-adapter loop from 8 adapters up.

    python benchmarks/kernels.py [--quick] [--dtype bf16] [--tune | --tuned bundle/kernels.json]
                                 [--compile all|headline|none] [--dry-run]

Prints a table and writes benchmarks/out/kernels.json (with the card's name), rewritten after every
row so an interrupted run keeps what it measured. Refuses on a machine without a CUDA GPU, except
``--dry-run`` (tiny shapes on the CPU under TRITON_INTERPRET=1: checks the script, measures nothing).
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from planc.kernels.dispatch import interpreting

OUT = Path(__file__).resolve().parent / "out" / "kernels.json"
TUNED_NAME = "kernels_tuned.json"
"""Written beside --out by --tune."""
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MODELS = {4096: dict(heads=32, kv_heads=8, head_dim=128, inter=14336),   # Llama-3-8B-like
          8192: dict(heads=64, kv_heads=8, head_dim=128, inter=28672)}   # Llama-3-70B-like


def refuse_without_gpu() -> None:
    if not torch.cuda.is_available():
        sys.exit("benchmarks/kernels.py needs a CUDA GPU and none is visible here; run it on a GPU host.")
    try:
        import triton  # noqa: F401  (only whether it imports)
    except ImportError:
        sys.exit("benchmarks/kernels.py needs Triton: pip install 'planc[triton]'.")


def bench(fn, warmup: int = 10, rep: int = 50) -> float:
    """Median milliseconds (warmup and rep are milliseconds of running, as do_bench takes them).
    Without a GPU (--dry-run) a wall-clock median of three runs after one warm-up."""
    if not torch.cuda.is_available():
        fn()
        return statistics.median(_wall_ms(fn) for _ in range(3))
    from triton.testing import do_bench

    return do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def _wall_ms(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def tune_on_device(dtype, sizes: dict, seed: int = 0) -> tuple[dict, list]:
    """The tune_kernels pass's problems and autotuner for each model shape of `sizes`, timed here.

    Returns the table (op -> shape class -> config, as kernels.json holds it) and one summary row
    per tuned class: candidates timed, rejected, the winner and its time against the default's."""
    from planc.models.config import parse_arch
    from planc.passes.tune_kernels import device_timers, serving_problems, tune_classes

    name = {v: k for k, v in DTYPES.items()}[dtype]
    table, summary, gen = {}, [], torch.Generator().manual_seed(seed)
    for hidden, m in sizes["models"].items():
        arch = parse_arch({"model_type": "llama", "hidden_size": hidden, "num_attention_heads": m["heads"],
                           "num_key_value_heads": m["kv_heads"], "intermediate_size": m["inter"],
                           "num_hidden_layers": 1, "vocab_size": 128256,
                           "torch_dtype": {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[name]},
                          f"llama hidden={hidden}")
        lora_shapes = {dims: [8, 16, 32, 64] for dims in sizes["lora_dims"] if dims[0] == hidden}
        problems = serving_problems(arch, lora_shapes, 16, sizes["batches"], sizes["contexts"],
                                    torch.device(sizes["device"]), gen)
        on_gpu = sizes["device"] == "cuda"
        for op, args, result in tune_classes(problems, None if on_gpu else bench):
            cls = result.shape_class
            timer = device_timers(op)[0] if on_gpu else bench
            table.setdefault(op, {})[cls] = result.best
            best_ms = min(t for _, t in result.timings)
            summary.append({"op": op, "class": cls, "best": result.best, "best_ms": best_ms,
                            "torch_ms": result.timings[0][1],  # tune() times torch first
                            "candidates": len(result.timings) - 1, "rejected": len(result.rejected),
                            "rejected_why": sorted({why for _, why in result.rejected})[:3],
                            "default_ms": timer(lambda: _triton(op)(*args, config=None))})
            print(f"tuned {op:<17} {cls:<58} {summary[-1]['candidates']:3d} ok {summary[-1]['rejected']:2d} "
                  f"rejected  best {best_ms * 1e3:8.1f} us  default {summary[-1]['default_ms'] * 1e3:8.1f} us  "
                  f"{json.dumps(result.best)}", flush=True)
            torch.cuda.empty_cache()
    return table, summary


def _triton(op):
    from planc.kernels import KernelRegistry

    return KernelRegistry.builtin().get(op, "triton").resolve()


def copy_bandwidth(device: str) -> float:
    """Bytes/s of a 1 GiB device copy (read + write); 64 MiB on the CPU (--dry-run)."""
    src = torch.empty(2**30 if device == "cuda" else 2**26, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    return 2 * src.numel() / (ms * 1e-3)


# ---------------------------------------------------------------- cases: (op, label, args, min bytes)
def _nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


SIZES = {
    "full": dict(device="cuda", models=MODELS, rows=[1, 16, 64, 256, 2048], batches=[1, 8, 32, 128, 256],
                 contexts=[512, 2048, 8192], lora_dims=[(4096, 4096), (4096, 14336)], adapters=[1, 8, 32],
                 lora_rows=[64, 256]),
    "quick": dict(device="cuda", models=MODELS, rows=[1, 16, 256, 2048], batches=[1, 32, 256], contexts=[2048, 8192],
                  lora_dims=[(4096, 4096), (4096, 14336)], adapters=[1, 8, 32], lora_rows=[256]),
    # --dry-run: the same code paths on the CPU under TRITON_INTERPRET=1 (CI keeps the script working).
    "dry": dict(device="cpu", models={96: dict(heads=4, kv_heads=2, head_dim=24, inter=160)}, rows=[1, 5],
                batches=[1, 3], contexts=[40], lora_dims=[(96, 96)], adapters=[1, 2], lora_rows=[5]),
}


def cases(dtype, sizes: dict):
    from planc.kernels import problems

    gen, dev = torch.Generator().manual_seed(0), sizes["device"]
    for hidden, m in sizes["models"].items():
        for rows in sizes["rows"]:
            x, w, eps = problems.rms_norm(rows, hidden, dtype, dev, gen)
            yield "rms_norm", f"rows={rows} hidden={hidden}", (x, w, eps), 2 * _nbytes(x) + _nbytes(w)
            a = problems.add_rms_norm(rows, hidden, dtype, dev, gen)
            yield "add_rms_norm", f"rows={rows} hidden={hidden}", a, 4 * _nbytes(a[0]) + _nbytes(a[2])
            g, u = problems.silu_mul(rows, m["inter"], dtype, dev, gen)
            yield "silu_mul", f"rows={rows} dim={m['inter']}", (g, u), 3 * _nbytes(g)
            q, k, cos, sin = problems.apply_rotary(rows, m["heads"], m["kv_heads"], m["head_dim"], dtype, dev, gen)
            yield "apply_rotary", f"tokens={rows} heads={m['heads']}/{m['kv_heads']}", (q, k, cos, sin), \
                2 * _nbytes(q, k) + _nbytes(cos, sin)
            kv = problems.write_kv(rows, m["kv_heads"], m["head_dim"], 16, dtype, dev, gen)
            yield "write_kv", f"tokens={rows} kv={m['kv_heads']}x{m['head_dim']}", kv, 2 * _nbytes(kv[2], kv[3])
        for batch in sizes["batches"]:
            for ctx in sizes["contexts"]:
                lens = [ctx] * batch
                args = problems.decode_attention(lens, m["heads"], m["kv_heads"], m["head_dim"], 16, dtype, dev, gen,
                                                 spare_pages=0)
                kv_bytes = 2 * batch * ctx * m["kv_heads"] * m["head_dim"] * args[0].element_size()
                yield "decode_attention", f"batch={batch} ctx={ctx} heads={m['heads']}/{m['kv_heads']}", args, \
                    kv_bytes + 2 * _nbytes(args[0])
    for in_dim, out_dim in sizes["lora_dims"]:
        for adapters in sizes["adapters"]:
            for rows in sorted({adapters, *sizes["lora_rows"]}):
                if rows < adapters:
                    continue
                per = [rows // adapters + (i < rows % adapters) for i in range(adapters)]
                ranks = [[8, 16, 32, 64][i % 4] for i in range(adapters)]
                y, x, groups = problems.lora_delta(per, ranks, in_dim, out_dim, dtype, dev, gen)
                weights = sum(_nbytes(a, b) for _, a, b, _ in groups)
                yield "lora_delta", f"adapters={adapters} rows={rows} {in_dim}->{out_dim} ranks 8-64", (y, x, groups), \
                    weights + _nbytes(x) + 2 * _nbytes(y)


# ---------------------------------------------------------------- one case
def _upcast(a):
    if isinstance(a, torch.Tensor):
        return a.float() if a.is_floating_point() else a
    if isinstance(a, (list, tuple)):
        return type(a)(_upcast(x) for x in a)
    return a


def _first(result, args, op):
    if op == "write_kv":
        return args[0]
    return result[0] if isinstance(result, tuple) else result


def check(op, args, triton_fn, config) -> float:
    """Relative error of the Triton output against the fp32 reference on the same inputs."""
    from planc.kernels import reference

    want_args = _upcast(_deep_clone(args))
    want = _first(getattr(reference, op)(*want_args), want_args, op)
    got_args = _deep_clone(args)
    got = _first(triton_fn(*got_args, config=config), got_args, op)
    if op == "write_kv":
        slots, size = args[4], args[0].shape[1]
        got, want = got[slots // size, slots % size], want[slots // size, slots % size]
    return ((got.float() - want).abs().max() / want.abs().max().clamp_min(1e-6)).item()


def _deep_clone(a):
    if isinstance(a, torch.Tensor):
        return a.clone()
    if isinstance(a, (list, tuple)):
        return type(a)(_deep_clone(x) for x in a)
    return a


def graph_ms(call, args, min_bytes: int) -> tuple[Optional[float], str]:
    """Device milliseconds per call with the host's launch overhead taken out.

    K calls, each on its own copy of the inputs (together at least 4x the L2, so every call reads
    memory, not cache), are captured in one CUDA graph; the median of 10 replays / K. Returns
    (None, why) where the call cannot be captured (a host sync, a pageable copy) or the
    copies would not fit. At serving shapes the row-wise ops move a few MB in a few microseconds,
    so a plain launch-timed loop measures Python and the driver, not the kernel."""
    if args[0].device.type != "cuda":
        return None, "not on a GPU"
    props = torch.cuda.get_device_properties(0)
    l2 = getattr(props, "L2_cache_size", 64 * 2**20) or 64 * 2**20
    k = max(1, min(200, -(-4 * l2 // max(min_bytes, 1))))
    if k * min_bytes > 0.25 * torch.cuda.mem_get_info()[0]:
        k = 1
    try:
        sets = [args] + [_deep_clone(args) for _ in range(k - 1)]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for one in sets[:2]:
                call(one)  # compiles, autotunes and allocates outside the capture
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for one in sets:
                call(one)
        graph.replay()
        torch.cuda.synchronize()
        times = []
        for _ in range(10):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / k)
        del graph, sets
        return statistics.median(times), f"graph of {k}"
    except Exception as exc:  # noqa: BLE001  (an uncapturable baseline is reported as such)
        torch.cuda.synchronize()
        return None, f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"[:160]


def graphable(op: str, key: str) -> bool:
    """Calls that hold no host sync or pageable copy: the decode reference reads the longest context
    (.item()) and the LoRA wrapper copies its per-adapter tables from the host each call, so both
    are timed with their launches (as a server without graphs would run them)."""
    if op == "lora_delta":
        return False
    return not (op == "decode_attention" and key in ("eager", "compile"))


def measure(row: dict, key: str, call, args, min_bytes: int, copy_bw: float) -> None:
    """row[key_ms] (do_bench: launches from Python included) and row[key_graph_ms] (device time)."""
    row[f"{key}_ms"] = bench(lambda: call(args))
    if not graphable(row["op"], key):
        row[f"{key}_frac_of_copy_bw"] = min_bytes / (row[f"{key}_ms"] * 1e-3) / copy_bw
        return
    ms, how = graph_ms(call, args, min_bytes)
    row[f"{key}_graph"] = how
    if ms is not None:
        row[f"{key}_graph_ms"] = ms
        row[f"{key}_frac_of_copy_bw"] = min_bytes / (ms * 1e-3) / copy_bw


def run_case(op, label, args, min_bytes, registry, tuned, compiled, copy_bw, compile_here: bool):
    from planc.kernels import reference, shapes

    impl = registry.get(op, "triton").resolve()
    config = (tuned.get(op) or {}).get(shapes.shape_class(op, *args))
    tol = 1e-4 if args[0].dtype == torch.float32 else 2e-2
    row = {"op": op, "shape": label, "min_bytes": min_bytes, "tuned_config": config}
    row["rel_error"] = err = check(op, args, impl, None)
    if not err < tol:
        row["status"] = f"WRONG (relative error {err:.2e} >= {tol})"
        return row
    measure(row, "triton", lambda a: impl(*a, config=None), args, min_bytes, copy_bw)
    if config is not None and config.get("impl", "triton") == "triton":
        row["tuned_rel_error"] = err = check(op, args, impl, config)
        if not err < tol:
            row["status"] = f"WRONG with the tuned config (relative error {err:.2e} >= {tol})"
            return row
        measure(row, "tuned", lambda a: impl(*a, config=config), args, min_bytes, copy_bw)
    ref = getattr(reference, op)  # the decode reference gathers K/V in bounded slices: it fits where the kernel does
    measure(row, "eager", lambda a: ref(*a), args, min_bytes, copy_bw)
    if compiled is not None and compile_here:
        fn = compiled.setdefault(op, torch.compile(ref, dynamic=False))
        try:
            measure(row, "compile", lambda a: fn(*a), args, min_bytes, copy_bw)
        except Exception as exc:  # noqa: BLE001  (a baseline that does not compile is reported, not fatal)
            row["compile_error"] = f"{type(exc).__name__}: {exc}"[:200]
    row["status"] = "ok"
    return row


def headline(op: str, label: str) -> bool:
    """The largest shape of each op and model in the case list (where --compile headline compiles)."""
    if op == "decode_attention":
        return "batch=256 " in label
    return "rows=2048 " in label or "tokens=2048 " in label or "adapters=32 rows=256 " in label


def fmt(row, key) -> str:
    """Microseconds: the graphed device time, else (in brackets) the launch-timed one."""
    if f"{key}_graph_ms" in row:
        return f"{row[f'{key}_graph_ms'] * 1e3:.1f}"
    return f"({row[f'{key}_ms'] * 1e3:.1f})" if f"{key}_ms" in row else "-"


def pct(row, key) -> str:
    return f"{100 * row[f'{key}_frac_of_copy_bw']:.0f}" if f"{key}_frac_of_copy_bw" in row else "-"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer shapes")
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny shapes on the CPU under TRITON_INTERPRET=1 (checks the script, measures nothing)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    tuning = parser.add_mutually_exclusive_group()
    tuning.add_argument("--tune", action="store_true", help="run the tune_kernels pass's autotuner here first")
    tuning.add_argument("--tuned", type=Path, help="kernels.json from the tune_kernels pass")
    parser.add_argument("--compile", choices=("all", "headline", "none"), default="all",
                        help="where to time the torch.compile baseline")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    sizes = SIZES["dry" if args.dry_run else "quick" if args.quick else "full"]
    if args.dry_run:
        if not interpreting():
            sys.exit("benchmarks/kernels.py --dry-run needs TRITON_INTERPRET=1 (set before Python starts).")
        args.compile = "none"
    else:
        refuse_without_gpu()
    import triton

    from planc.kernels import KernelRegistry, load_tuned

    for knob in ("recompile_limit", "cache_size_limit"):  # every shape is a recompile; never fall back to eager
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, 1024)
    dtype = DTYPES[args.dtype]
    registry, tuned, tune_summary = KernelRegistry.builtin(), (load_tuned(args.tuned) if args.tuned else {}), []
    copy_bw = copy_bandwidth(sizes["device"])
    device = "CPU (dry run, interpreter)" if args.dry_run else torch.cuda.get_device_name()
    print(f"{device}: measured copy bandwidth {copy_bw / 1e9:.0f} GB/s; dtype {args.dtype}", flush=True)
    report = {"device": device, "copy_bandwidth_bytes_per_s": copy_bw, "dtype": args.dtype,
              "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join(["python", "benchmarks/kernels.py", *(argv if argv is not None else sys.argv[1:])]),
              "tuned": "tuned here (--tune)" if args.tune else (str(args.tuned) if args.tuned else None),
              "tune_summary": tune_summary, "rows": []}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.tune:
        tuned, summary = tune_on_device(dtype, sizes)
        tune_summary.extend(summary)
        args.out.with_name(TUNED_NAME).write_text(json.dumps(tuned, indent=1))
        args.out.write_text(json.dumps(report, indent=1))
    print("us: device time per call (CUDA graph, inputs rotated past the L2); in brackets where it could not be "
          "graphed, do_bench with launches. %: of copy bandwidth")
    print(f"{'op':<17} {'shape':<44} {'err':>8} {'triton':>9} {'%':>4} {'tuned':>9} {'%':>4} {'eager':>10} "
          f"{'compile':>10}")
    rows, compiled = report["rows"], (None if args.compile == "none" else {})
    for op, label, case_args, min_bytes in cases(dtype, sizes):
        row = run_case(op, label, case_args, min_bytes, registry, tuned, compiled, copy_bw,
                       args.compile == "all" or headline(op, label))
        rows.append(row)
        print(f"{op:<17} {label:<44} {row['rel_error']:8.1e} {fmt(row, 'triton'):>9} {pct(row, 'triton'):>4} "
              f"{fmt(row, 'tuned'):>9} {pct(row, 'tuned'):>4} {fmt(row, 'eager'):>10} {fmt(row, 'compile'):>10}"
              + ("" if row["status"] == "ok" else f"  {row['status']}"), flush=True)
        args.out.write_text(json.dumps(report, indent=1))
        del case_args
        torch.cuda.empty_cache()
    wrong = [r for r in rows if r["status"] != "ok"]
    print(f"wrote {args.out}; {len(rows) - len(wrong)} cases ok, {len(wrong)} wrong")
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
