"""Triton kernels (issue 7) on a CUDA GPU: correctness, then achieved bandwidth against torch.

For every kernel at serving shapes (batch 1-256, hidden 4096 and 8192, contexts up to 8k, LoRA
batches of 1-32 adapters of mixed ranks) it first checks the Triton output against the torch
reference run in fp32 on the same inputs, then times, in the same process and on the same inputs:

- triton: planc's kernel with its default (heuristic) config, or the tuned one with --tuned kernels.json;
- eager: the torch reference (``planc.kernels.reference``; for LoRA that is the per-adapter loop);
- compile: ``torch.compile`` of the same reference.

Achieved bandwidth = the bytes an op must move at least (inputs read once, outputs written once)
/ time, as a fraction of the device's measured copy bandwidth (a large device-to-device
``copy_``, read + write). Times are ``triton.testing.do_bench`` medians. Targets (issue 7):
rms_norm, silu_mul and decode_attention at >= 70% of copy bandwidth; lora_delta faster than the
per-adapter loop from 8 adapters up.

    python benchmarks/kernels.py [--quick] [--dtype bf16] [--tuned bundle/kernels.json] [--no-compile]

Prints a table and writes benchmarks/out/kernels.json (with the card's name). Refuses on a machine
without a CUDA GPU.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from pathlib import Path

import torch

OUT = Path(__file__).resolve().parent / "out" / "kernels.json"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MODELS = {4096: dict(heads=32, kv_heads=8, head_dim=128, inter=14336),   # Llama-3-8B-like
          8192: dict(heads=64, kv_heads=8, head_dim=128, inter=28672)}   # Llama-3-70B-like


def refuse_without_gpu() -> None:
    if not torch.cuda.is_available():
        sys.exit("benchmarks/kernels.py needs a CUDA GPU and none is visible here; run it on a GPU host.")
    try:
        import triton  # noqa: F401
    except ImportError:
        sys.exit("benchmarks/kernels.py needs Triton: pip install 'planc[triton]'.")


def bench(fn) -> float:
    """Median milliseconds."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=10, rep=50, return_mode="median")


def copy_bandwidth() -> float:
    """Bytes/s of a 1 GiB device copy (read + write)."""
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    return 2 * src.numel() / (ms * 1e-3)


# ---------------------------------------------------------------- cases: (op, label, args, min bytes, eager ok)
def _nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def cases(dtype, quick: bool):
    from planc.kernels import problems

    gen = torch.Generator().manual_seed(0)
    rows_list = [1, 16, 256] if quick else [1, 16, 64, 256]
    for hidden, m in MODELS.items():
        for rows in rows_list:
            x, w, eps = problems.rms_norm(rows, hidden, dtype, "cuda", gen)
            yield "rms_norm", f"rows={rows} hidden={hidden}", (x, w, eps), 2 * _nbytes(x) + _nbytes(w)
            a = problems.add_rms_norm(rows, hidden, dtype, "cuda", gen)
            yield "add_rms_norm", f"rows={rows} hidden={hidden}", a, 4 * _nbytes(a[0]) + _nbytes(a[2])
            g, u = problems.silu_mul(rows, m["inter"], dtype, "cuda", gen)
            yield "silu_mul", f"rows={rows} dim={m['inter']}", (g, u), 3 * _nbytes(g)
            q, k, cos, sin = problems.apply_rotary(rows, m["heads"], m["kv_heads"], m["head_dim"], dtype, "cuda", gen)
            yield "apply_rotary", f"tokens={rows} heads={m['heads']}/{m['kv_heads']}", (q, k, cos, sin), \
                2 * _nbytes(q, k) + _nbytes(cos, sin)
            kv = problems.write_kv(rows, m["kv_heads"], m["head_dim"], 16, dtype, "cuda", gen)
            yield "write_kv", f"tokens={rows} kv={m['kv_heads']}x{m['head_dim']}", kv, 2 * _nbytes(kv[2], kv[3])
        for batch in ([1, 32, 256] if quick else [1, 8, 32, 128, 256]):
            for ctx in ([2048, 8192] if quick else [512, 2048, 8192]):
                lens = [ctx] * batch
                args = problems.decode_attention(lens, m["heads"], m["kv_heads"], m["head_dim"], 16, dtype, "cuda", gen,
                                                 spare_pages=0)
                kv_bytes = 2 * batch * ctx * m["kv_heads"] * m["head_dim"] * args[0].element_size()
                yield "decode_attention", f"batch={batch} ctx={ctx} heads={m['heads']}/{m['kv_heads']}", args, \
                    kv_bytes + 2 * _nbytes(args[0])
    for in_dim, out_dim in [(4096, 4096), (4096, 14336)]:
        for adapters in [1, 8, 32]:
            for rows in ([adapters, 256] if quick else sorted({adapters, 64, 256})):
                if rows < adapters:
                    continue
                per = [rows // adapters + (i < rows % adapters) for i in range(adapters)]
                ranks = [[8, 16, 32, 64][i % 4] for i in range(adapters)]
                y, x, groups = problems.lora_delta(per, ranks, in_dim, out_dim, dtype, "cuda", gen)
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


def _clone(args):
    return tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)


def check(op, args, triton_fn, config) -> float:
    """Relative error of the Triton output against the fp32 reference on the same inputs."""
    from planc.kernels import reference

    want_args = _upcast(_clone(args))
    want = _first(getattr(reference, op)(*want_args), want_args, op)
    got_args = _clone(args)
    got = _first(triton_fn(*got_args, config=config), got_args, op)
    if op == "write_kv":
        slots, size = args[4], args[0].shape[1]
        got, want = got[slots // size, slots % size], want[slots // size, slots % size]
    return ((got.float() - want).abs().max() / want.abs().max().clamp_min(1e-6)).item()


def eager_fits(op, args) -> bool:
    """The decode reference gathers every context (times the GQA ratio): skip it where that would not fit."""
    if op != "decode_attention":
        return True
    q, k_pages, _, tables, lens = args[:5]
    gathered = 2 * len(lens) * int(lens.max()) * q.shape[1] * q.shape[2] * q.element_size() * 2
    return gathered < 0.5 * torch.cuda.mem_get_info()[0]


def run_case(op, label, args, min_bytes, registry, tuned, compiled, copy_bw):
    from planc.kernels import reference, shapes

    impl = registry.get(op, "triton").resolve()
    config = (tuned.get(op) or {}).get(shapes.shape_class(op, *args))
    tol = 1e-4 if args[0].dtype == torch.float32 else 2e-2
    row = {"op": op, "shape": label, "min_bytes": min_bytes, "config": config}
    row["rel_error"] = err = check(op, args, impl, config)
    if not err < tol:
        row["status"] = f"WRONG (relative error {err:.2e} >= {tol})"
        return row
    row["triton_ms"] = bench(lambda: impl(*args, config=config))
    row["triton_frac_of_copy_bw"] = min_bytes / (row["triton_ms"] * 1e-3) / copy_bw
    if eager_fits(op, args):
        ref = getattr(reference, op)
        row["eager_ms"] = bench(lambda: ref(*args))
        if compiled is not None:
            fn = compiled.setdefault(op, torch.compile(ref, dynamic=False))
            try:
                row["compile_ms"] = bench(lambda: fn(*args))
            except Exception as exc:  # noqa: BLE001  (a baseline that does not compile is reported, not fatal)
                row["compile_error"] = f"{type(exc).__name__}: {exc}"[:200]
    row["status"] = "ok"
    return row


def fmt(row, key) -> str:
    return f"{row[key] * 1e3:.1f}" if key in row else "-"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer shapes")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--tuned", type=Path, help="kernels.json from the tune_kernels pass")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    refuse_without_gpu()
    import triton

    from planc.kernels import KernelRegistry, load_tuned

    registry, tuned = KernelRegistry.builtin(), (load_tuned(args.tuned) if args.tuned else {})
    copy_bw = copy_bandwidth()
    device = torch.cuda.get_device_name()
    print(f"{device}: measured copy bandwidth {copy_bw / 1e9:.0f} GB/s; dtype {args.dtype}")
    print(f"{'op':<17} {'shape':<44} {'err':>8} {'triton us':>10} {'%copy':>6} {'eager us':>9} {'compile us':>10}")
    rows, compiled = [], (None if args.no_compile else {})
    for op, label, case_args, min_bytes in cases(DTYPES[args.dtype], args.quick):
        row = run_case(op, label, case_args, min_bytes, registry, tuned, compiled, copy_bw)
        rows.append(row)
        frac = f"{100 * row['triton_frac_of_copy_bw']:.0f}" if "triton_frac_of_copy_bw" in row else row["status"]
        print(f"{op:<17} {label:<44} {row['rel_error']:8.1e} {fmt(row, 'triton_ms'):>10} {frac:>6} "
              f"{fmt(row, 'eager_ms'):>9} {fmt(row, 'compile_ms'):>10}", flush=True)
        del case_args
        torch.cuda.empty_cache()
    report = {"device": device, "copy_bandwidth_bytes_per_s": copy_bw, "dtype": args.dtype,
              "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "tuned": str(args.tuned) if args.tuned else None, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    wrong = [r for r in rows if r["status"] != "ok"]
    print(f"wrote {args.out}; {len(rows) - len(wrong)} cases ok, {len(wrong)} wrong")
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
