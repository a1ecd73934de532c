"""Compile the Triton kernels for a GPU target on a machine without one (ahead of time, no launch).

The interpreter (``TRITON_INTERPRET=1``) runs a kernel's Python on numpy and accepts code the GPU
compiler refuses (a constexpr of the wrong type, a dot tile under 16, too much shared memory).
This module closes that gap without a GPU: it runs the host wrappers on CPU tensors, intercepts
each launch, and hands the kernel to ``triton.compile`` for a CUDA target (``sm_90`` by default),
down to a cubin with Triton's bundled ``ptxas``. Nothing is launched, so outputs stay unwritten;
what comes back is, per launch, the kernel, its specialization, and the compiled kernel's shared
memory, or the compiler's error.

It must run in a process where ``TRITON_INTERPRET`` is unset (kernels are bound to the interpreter
when decorated), so tests call it through ``python -m planc.kernels.aot``:

    python -m planc.kernels.aot [--arch 90] [--candidates]       # exit 1 if any launch fails to compile

``--candidates`` adds every launch config the tuning pass tries, at Llama-3-8B and 70B shapes.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import torch

SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
"""Most dynamic shared memory one block may take, bytes, per compute capability (CUDA guide)."""

_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int64: "i64",
          torch.int32: "i32", torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8", torch.bool: "i1"}


@dataclass
class Launch:
    kernel: str
    signature: dict
    constexprs: dict
    options: dict
    shared: Optional[int] = None
    error: Optional[str] = None

    def key(self) -> tuple:
        return (self.kernel, tuple(self.signature.items()),
                tuple(sorted((k, repr(v)) for k, v in self.constexprs.items())), tuple(sorted(self.options.items())))


def _arg_type(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + _TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2**31 <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton type for {type(value).__name__}")


class Compiler:
    """Compiles each distinct launch once for ``sm_<arch>``; records every result in ``launches``."""

    def __init__(self, arch: int = 90):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)
        self.limit = SHARED_LIMIT.get(arch)
        self.launches: dict[tuple, Launch] = {}

    def __call__(self, jit_fn, args: tuple, kwargs: dict) -> None:
        import triton
        from triton.compiler import ASTSource

        kwargs = dict(kwargs)
        options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
        names = [p.name for p in jit_fn.params]
        bound = dict(zip(names, args), **kwargs)
        constexprs = {p.name: bound[p.name] for p in jit_fn.params if p.is_constexpr}
        signature = {n: "constexpr" if n in constexprs else _arg_type(bound[n]) for n in names}
        launch = Launch(jit_fn.fn.__name__, signature, constexprs, options)
        if launch.key() in self.launches:
            return
        self.launches[launch.key()] = launch
        try:
            compiled = triton.compile(ASTSource(jit_fn, signature, constexprs=constexprs), target=self.target,
                                      options=options)
        except Exception as exc:  # noqa: BLE001  (the compiler's error is the finding)
            launch.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
            return
        launch.shared = int(compiled.metadata.shared)
        if self.limit is not None and launch.shared > self.limit:
            launch.error = f"needs {launch.shared} bytes of shared memory, over sm_{self.target.arch}'s {self.limit}"

    def failures(self) -> list[Launch]:
        return [launch for launch in self.launches.values() if launch.error]


@contextlib.contextmanager
def compiling(arch: int = 90) -> Iterator[Compiler]:
    """Within the block, Triton launches compile for ``sm_<arch>`` instead of running, and the host
    wrappers accept CPU tensors. Import the wrappers inside the block, or after it has begun."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("planc.kernels.aot needs TRITON_INTERPRET unset: kernels decorated for the "
                           "interpreter cannot be compiled")
    from triton.runtime.jit import JITFunction

    from planc.kernels import triton_util

    compiler = Compiler(arch)
    saved_run, saved_check = JITFunction.run, triton_util.check_tensors

    def run(self, *args, grid, warmup, **kwargs):
        compiler(self, args, kwargs)

    def check_tensors(op: str, *tensors: torch.Tensor, **_: Any) -> torch.device:
        return tensors[0].device

    JITFunction.run = run
    triton_util.check_tensors = check_tensors
    saved_modules = {m: sys.modules.pop(m) for m in _wrapper_modules()}  # re-imported: they bind check_tensors
    try:
        yield compiler
    finally:
        JITFunction.run, triton_util.check_tensors = saved_run, saved_check
        for m in _wrapper_modules():
            del sys.modules[m]
        sys.modules.update(saved_modules)


def _wrapper_modules() -> list[str]:
    """The imported Triton host-wrapper modules (triton_util, which holds check_tensors, excluded)."""
    return [m for m in list(sys.modules) if m.startswith("planc.kernels.triton_") and m != "planc.kernels.triton_util"]


# ---------------------------------------------------------------------------------------- what to compile
def _wrapper(op: str) -> Callable:
    from planc.kernels.dispatch import _TRITON_IMPLS

    module, name = _TRITON_IMPLS[op].split(":")
    return getattr(importlib.import_module(module), name)


def test_shape_launches(gen: torch.Generator) -> Iterator[tuple[str, tuple, Optional[dict]]]:
    """(op, args, config): small shapes like the interpreter tests', in the three dtypes."""
    from planc.kernels import problems

    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        yield "rms_norm", problems.rms_norm(3, 333, dtype, "cpu", gen), {"BLOCK": 64}
        yield "add_rms_norm", problems.add_rms_norm(3, 100, dtype, "cpu", gen), None
        yield "silu_mul", problems.silu_mul(3, 1000, dtype, "cpu", gen), None
        yield "apply_rotary", problems.apply_rotary(3, 8, 2, 24, dtype, "cpu", gen), {"BLOCK_H": 4}
        yield "write_kv", problems.write_kv(9, 2, 64, 16, dtype, "cpu", gen), None
        for lens, heads, kv_heads, dim, page, window, splits in (([33, 5], 8, 2, 24, 16, None, 3),
                                                                 ([50, 7], 16, 2, 32, 8, None, 1),
                                                                 ([30, 9], 8, 1, 16, 4, 8, 2)):
            args = problems.decode_attention(lens, heads, kv_heads, dim, page, dtype, "cpu", gen, window=window)
            yield "decode_attention", args, {"BLOCK_N": 16, "num_splits": splits}
        yield "lora_delta", problems.lora_delta([20, 1, 5], [16, 4, 8], 96, 200, dtype, "cpu", gen), \
            {"BLOCK_M": 16, "BLOCK_K": 32, "BLOCK_N": 32}


SERVING = {"8B": dict(hidden=4096, heads=32, kv_heads=8, head_dim=128, inter=14336),
           "70B": dict(hidden=8192, heads=64, kv_heads=8, head_dim=128, inter=28672)}


def candidate_launches(gen: torch.Generator) -> Iterator[tuple[str, tuple, Optional[dict]]]:
    """Every config the tuning pass tries, at Llama-3-8B and 70B shapes in bf16 (few rows: only the
    specialization matters, and it does not depend on row counts)."""
    from planc.kernels import problems
    from planc.kernels.autotune import CANDIDATES, _useful

    dtype = torch.bfloat16
    for m in SERVING.values():
        shaped = {"rms_norm": problems.rms_norm(2, m["hidden"], dtype, "cpu", gen),
                  "add_rms_norm": problems.add_rms_norm(2, m["hidden"], dtype, "cpu", gen),
                  "silu_mul": problems.silu_mul(2, m["inter"], dtype, "cpu", gen),
                  "apply_rotary": problems.apply_rotary(2, m["heads"], m["kv_heads"], m["head_dim"], dtype, "cpu", gen),
                  "write_kv": problems.write_kv(2, m["kv_heads"], m["head_dim"], 16, dtype, "cpu", gen),
                  "decode_attention": problems.decode_attention([4096, 100], m["heads"], m["kv_heads"], m["head_dim"],
                                                                16, dtype, "cpu", gen),
                  "lora_delta": problems.lora_delta([2, 1], [8, 64], m["hidden"], m["hidden"], dtype, "cpu", gen)}
        for op, args in shaped.items():
            for config in CANDIDATES[op]:
                if _useful(op, config, args):
                    yield op, args, config


def compile_all(arch: int = 90, candidates: bool = False, seed: int = 0) -> Compiler:
    gen = torch.Generator().manual_seed(seed)
    with compiling(arch) as compiler:
        for source in ([test_shape_launches] + ([candidate_launches] if candidates else [])):
            for op, args, config in source(gen):
                _wrapper(op)(*args, config=config)
    return compiler


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x10 (80: A100, 90: H100/H200)")
    parser.add_argument("--candidates", action="store_true", help="also every tuning candidate at 8B/70B shapes")
    args = parser.parse_args(argv)
    import triton

    try:
        compiler = compile_all(args.arch, args.candidates)
    except RuntimeError as exc:
        sys.exit(f"python -m planc.kernels.aot: {exc}")
    for launch in compiler.launches.values():
        consts = " ".join(f"{k}={v}" for k, v in launch.constexprs.items() if v is not None)
        opts = " ".join(f"{k}={v}" for k, v in launch.options.items())
        dtype = "+".join(sorted({t[1:] for t in launch.signature.values() if t[:2] in ("*f", "*b")}))
        status = f"FAILED {launch.error}" if launch.error else f"ok shared={launch.shared}"
        print(f"{launch.kernel:<24} {dtype:<9} {consts} {opts}: {status}")
    failed = compiler.failures()
    print(f"triton {triton.__version__} sm_{args.arch}: {len(compiler.launches)} distinct launches compiled, "
          f"{len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
