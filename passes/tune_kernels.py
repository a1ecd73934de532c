"""tune_kernels: the launch config (or torch) each kernel uses per shape class, for the bundle.

For a GPU target it times candidate configs of every Triton kernel on the device, at the shapes
this program serves (its hidden sizes, heads, LoRA ranks; batch and context buckets up to the
serving limits), and keeps the fastest per shape class. For a CPU target it records the torch path.
The result, ``program.extras["kernel_configs"]``, is a plain dict op -> shape class -> config that
is written to the bundle as ``kernels.json`` and read at server start by ``planc.kernels.load_tuned``.

Tuning runs only when this pass is in the pipeline, and only where the device is present:

>>> from planc.passes.tune_kernels import TuneKernelsPass
>>> TuneKernelsPass(target="cpu").name
'tune_kernels'
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from planc.errors import PlancError
from planc.kernels import autotune, problems
from planc.kernels.dispatch import interpreting, triton_available
from planc.kernels.shapes import bucket, shape_class
from planc.pass_manager import Pass, PassContext
from planc.program import Program

TUNED_OPS = ("rms_norm", "add_rms_norm", "silu_mul", "apply_rotary", "write_kv", "decode_attention", "lora_delta")


def device_timers(op: str) -> tuple[autotune.Timer, autotune.Timer]:
    """Median device milliseconds of a candidate, from a CUDA graph of repeated calls where the op
    can be captured (``do_bench_cudagraph``), so a small kernel is timed, not the ~20-60 us Python
    and driver cost of launching it, which would otherwise decide among configs at random (seen on
    an H200: decode at batch 1 tuned to a config 2.4x slower on device than the default).
    ``lora_delta`` copies its adapter tables from the host each call and is timed with its
    launches (``do_bench``), as it runs in a server; so is the decode reference, which reads the
    longest context from the device (a sync, which a graph cannot hold). Returns the timers for the
    Triton candidates and for the torch reference."""
    from triton.testing import do_bench, do_bench_cudagraph  # GPU only: CUDA events and graphs

    def launched(fn):
        return do_bench(fn, warmup=5, rep=20, return_mode="median")

    def graphed(fn):
        return do_bench_cudagraph(fn, rep=20, return_mode="median")

    if op == "lora_delta":
        return launched, launched
    return graphed, (launched if op == "decode_attention" else graphed)


class TuneKernelsPass(Pass):
    """Options (constructor or ``ctx.options["tune_kernels"]``): ``target`` ``gpu`` | ``cpu`` (default:
    gpu when CUDA is present); ``device`` to time on (default ``cuda``; ``cpu`` only under
    ``TRITON_INTERPRET=1``, for tests); ``batch_sizes`` and ``context_lens`` to tune at."""

    name = "tune_kernels"
    requires = ("adapter_zoo",)
    provides = ("kernel_configs",)

    def __init__(self, target: Optional[str] = None, device: Optional[str] = None,
                 timer: Optional[autotune.Timer] = None, batch_sizes: Optional[Sequence[int]] = None,
                 context_lens: Optional[Sequence[int]] = None,
                 candidates: Optional[dict[str, list[dict]]] = None, seed: int = 0):
        self.options = {"target": target, "device": device, "batch_sizes": batch_sizes, "context_lens": context_lens}
        self.timer, self.candidates, self.seed = timer, candidates, seed
        self.results: list[autotune.TuneResult] = []
        """Every class's timings after a GPU run (for reports); not part of the bundle."""

    def _option(self, ctx: PassContext, key: str):
        value = ctx.options_for(self.name).get(key)
        return value if value is not None else self.options[key]

    def run(self, program: Program, ctx: PassContext) -> bool:
        target = self._option(ctx, "target") or ("gpu" if torch.cuda.is_available() else "cpu")
        if target not in ("gpu", "cpu"):
            raise PlancError(f"tune_kernels: target must be gpu or cpu, not {target!r}")
        if target == "cpu":
            program.extras["kernel_configs"] = {op: {"*": {"impl": "torch"}} for op in TUNED_OPS}
            return True
        device = torch.device(self._option(ctx, "device") or "cuda")
        _check_device(device)
        table: dict[str, dict[str, dict]] = {}
        self.results = []
        for op, _, result in tune_classes(self._problems(program, ctx, device), self.timer, self.candidates):
            self.results.append(result)
            table.setdefault(op, {})[result.shape_class] = result.best
        program.extras["kernel_configs"] = table
        return True

    def _problems(self, program: Program, ctx: PassContext, device: torch.device):
        arch = program.base.checkpoint.arch
        serving = program.spec.serving
        max_len = serving.max_model_len or min(arch.max_position_embeddings, 4096)
        batches = list(self._option(ctx, "batch_sizes") or _powers(1, min(serving.max_running, 256)))
        contexts = list(self._option(ctx, "context_lens") or _powers(256, max(256, min(max_len, 8192))))
        return serving_problems(arch, _lora_shapes(program), serving.page_size, batches, contexts, device,
                                torch.Generator().manual_seed(self.seed))


def tune_classes(problems, timer: Optional[autotune.Timer] = None,
                 candidates: Optional[dict[str, list[dict]]] = None):
    """Tune each shape class of `problems` ((op, args) pairs) once: yields (op, args, TuneResult).
    Two problems of one class (k_proj and v_proj) are tuned at the first. Without `timer`, the
    device timers (`device_timers`)."""
    seen: set[tuple[str, str]] = set()
    for op, args in problems:
        cls = shape_class(op, *args)
        if (op, cls) in seen:
            continue
        seen.add((op, cls))
        timer_for, reference_timer = (timer, timer) if timer else device_timers(op)
        yield op, args, autotune.tune(op, args, timer_for, candidates=(candidates or {}).get(op),
                                      reference_timer=reference_timer)


def _check_device(device: torch.device) -> None:
    if not triton_available():
        raise PlancError("tune_kernels: a GPU target needs Triton installed (pip install 'planc[triton]')")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PlancError("tune_kernels: the target is a GPU but no CUDA device is present here; "
                         "run the compile on the GPU host, or tune for target cpu")
    if device.type == "cpu" and not interpreting():
        raise PlancError("tune_kernels: timing Triton kernels on the CPU needs TRITON_INTERPRET=1")


def _powers(lo: int, hi: int) -> list[int]:
    return [1 << i for i in range(int(math.log2(lo)), int(math.log2(bucket(hi))) + 1)]


def _lora_shapes(program: Program) -> dict[tuple[int, int], list[int]]:
    """(in, out) of every adapted Linear -> the distinct ranks adapters give it."""
    out: dict[tuple[int, int], set[int]] = {}
    for delta in (program.adapter_zoo or {}).values():
        for m in delta.modules:
            out.setdefault((m.a.shape[1], m.b.shape[0]), set()).add(m.rank)
    return {k: sorted(v) for k, v in out.items()}


def serving_problems(arch, lora_shapes: dict[tuple[int, int], list[int]], page_size: int, batches: list[int],
                     contexts: list[int], device: torch.device, gen: torch.Generator):
    """(op, args) at every shape class this model serves. Row-wise ops are tuned at the largest batch
    (their classes do not depend on rows); decode attention and LoRA per batch bucket."""
    dtype = arch.torch_dtype
    rows = max(batches)
    yield "rms_norm", problems.rms_norm(rows, arch.hidden_size, dtype, device, gen)
    yield "add_rms_norm", problems.add_rms_norm(rows, arch.hidden_size, dtype, device, gen)
    yield "silu_mul", problems.silu_mul(rows, arch.intermediate_size, dtype, device, gen)
    yield "apply_rotary", problems.apply_rotary(rows, arch.num_heads, arch.num_kv_heads, arch.head_dim, dtype,
                                                device, gen)
    yield "write_kv", problems.write_kv(rows, arch.num_kv_heads, arch.head_dim, page_size, dtype, device, gen)
    for batch in batches:
        for ctx in contexts:
            yield "decode_attention", problems.decode_attention([ctx] * batch, arch.num_heads, arch.num_kv_heads,
                                                                arch.head_dim, page_size, dtype, device, gen)
    for (in_dim, out_dim), ranks in lora_shapes.items():
        for batch in batches:
            num_adapters = min(batch, 8)
            adapter_ranks = [ranks[i % len(ranks)] for i in range(num_adapters)]
            per = [batch // num_adapters + (i < batch % num_adapters) for i in range(num_adapters)]
            yield "lora_delta", problems.lora_delta(per, adapter_ranks, in_dim, out_dim, dtype, device, gen)
