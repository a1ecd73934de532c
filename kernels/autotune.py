"""Time candidate launch configs of each Triton kernel on representative inputs; keep the fastest.

Tuning happens once, ahead of serving (the ``tune_kernels`` pass), with a timer the caller passes
(``triton.testing.do_bench`` on a GPU; any ``fn -> milliseconds`` elsewhere, e.g. under
``TRITON_INTERPRET=1`` in tests). It does not use ``triton.autotune``: that tunes inside the
serving process at the first call of each shape, while the bundle must carry the winners so the
server starts tuned. The torch reference is timed as one more candidate, so a shape class where
torch wins (tiny LoRA batches, say) records ``{"impl": "torch"}``.

Every candidate is checked against the torch reference before it is timed; one that fails to
launch (too much shared memory) or disagrees is dropped.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from planc.kernels import reference, shapes
from planc.kernels.dispatch import KernelRegistry

Timer = Callable[[Callable[[], Any]], float]


def _grid(**axes) -> list[dict]:
    keys = list(axes)
    return [dict(zip(keys, values)) for values in itertools.product(*axes.values())]


CANDIDATES: dict[str, list[dict]] = {
    "rms_norm": _grid(BLOCK=[1024, 2048, 4096, 8192], num_warps=[4, 8, 16]),
    "add_rms_norm": _grid(BLOCK=[1024, 2048, 4096, 8192], num_warps=[4, 8, 16]),
    "silu_mul": _grid(BLOCK=[512, 1024, 2048, 4096], num_warps=[4, 8]),
    "apply_rotary": _grid(BLOCK_H=[4, 8, 16, 32], num_warps=[2, 4, 8]),
    "write_kv": _grid(num_warps=[1, 2, 4, 8]),
    "decode_attention": _grid(BLOCK_N=[32, 64, 128], num_splits=[1, 2, 4, 8, 16, 32], num_warps=[4, 8],
                              num_stages=[2]),
    "lora_delta": _grid(BLOCK_M=[16, 32], BLOCK_K=[32, 64, 128], BLOCK_N=[64, 128], num_warps=[4]),
}


def _useful(op: str, config: dict, args: tuple) -> bool:
    """Skip configs that cannot differ from a smaller one (a block wider than the whole row)."""
    if op in ("rms_norm", "add_rms_norm"):
        return config["BLOCK"] // 2 < args[0].shape[-1] or config["BLOCK"] == 1024
    if op == "apply_rotary":
        return config["BLOCK_H"] // 2 < args[0].shape[1] or config["BLOCK_H"] == 4
    if op == "decode_attention":
        max_ctx = args[3].shape[1] * args[1].shape[1]
        return config["num_splits"] * config["BLOCK_N"] <= max(max_ctx, config["BLOCK_N"])
    return True


@dataclass
class TuneResult:
    op: str
    shape_class: str
    best: dict
    timings: list[tuple[dict, float]] = field(default_factory=list)
    """(config, milliseconds) of every candidate that ran correctly."""
    rejected: list[tuple[dict, str]] = field(default_factory=list)


def _outputs(op: str, result: Any, args: tuple) -> list[torch.Tensor]:
    if op == "write_kv":
        return [args[0], args[1]]  # in place: the pools are the output
    return list(result) if isinstance(result, tuple) else [result]


def _fresh(args: tuple) -> tuple:
    """Copies of tensor args: in-place ops must not see another candidate's writes when checked."""
    return tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)


def _agrees(got: list[torch.Tensor], want: list[torch.Tensor], dtype: torch.dtype) -> bool:
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    return all(torch.allclose(g.float(), w.float(), rtol=tol, atol=tol * max(1.0, w.float().abs().max().item()))
               for g, w in zip(got, want))


def tune(op: str, args: tuple, timer: Timer, registry: Optional[KernelRegistry] = None,
         candidates: Optional[list[dict]] = None, reference_timer: Optional[Timer] = None) -> TuneResult:
    """Check, time and rank `candidates` (default: CANDIDATES[op]) of `op` on `args`, plus torch
    (timed with `reference_timer` when given: a reference that syncs cannot be graph-timed)."""
    registry = registry or KernelRegistry.builtin()
    triton_fn = registry.get(op, "triton").resolve()
    torch_fn = getattr(reference, op)
    pristine = _fresh(args)  # timing runs in-place ops (lora_delta) on `args` over and over
    want_args = _fresh(pristine)
    want = _outputs(op, torch_fn(*want_args), want_args)
    dtype = args[0].dtype
    result = TuneResult(op, shapes.shape_class(op, *args), {"impl": "torch"})
    result.timings.append(({"impl": "torch"}, (reference_timer or timer)(lambda: torch_fn(*args))))
    for config in candidates if candidates is not None else CANDIDATES[op]:
        if not _useful(op, config, args):
            continue
        trial = _fresh(pristine)
        try:
            got = _outputs(op, triton_fn(*trial, config=config), trial)
        except Exception as exc:  # noqa: BLE001  (a config the device cannot launch is just not a candidate)
            result.rejected.append((config, f"{type(exc).__name__}: {exc}"[:200]))
            continue
        if not _agrees(got, want, dtype):
            result.rejected.append((config, "disagrees with the torch reference"))
            continue
        result.timings.append(({"impl": "triton", **config}, timer(lambda c=config: triton_fn(*args, config=c))))
    result.best = min(result.timings, key=lambda t: t[1])[0]
    return result
