"""Shape classes: the key under which a tuned launch config is stored and looked up.

A class names what decides the best config (dtype, the model's fixed dims, and power-of-two
buckets of the dims that vary per step) and nothing else, so a table tuned once covers every
batch the server sees. The tuning pass and the dispatch both call :func:`shape_class`, which is
why it lives here, torch-only, importable without Triton.

>>> import torch
>>> shape_class("rms_norm", torch.zeros(3, 4096, dtype=torch.bfloat16), torch.ones(4096), 1e-6)
'bf16,hidden=4096'
"""
from __future__ import annotations

from typing import Any, Callable

import torch

_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def dtype_name(dtype: torch.dtype) -> str:
    return _DTYPES.get(dtype, str(dtype).removeprefix("torch."))


def bucket(n: int) -> int:
    """Smallest power of two >= n (n >= 1): batch and context sizes are tuned per bucket."""
    return 1 << max(0, int(n) - 1).bit_length()


def _rms_norm(x, weight, eps) -> str:
    return f"{dtype_name(x.dtype)},hidden={x.shape[-1]}"


def _add_rms_norm(x, residual, weight, eps) -> str:
    return _rms_norm(x, weight, eps)


def _silu_mul(gate, up) -> str:
    return f"{dtype_name(gate.dtype)},dim={gate.shape[-1]}"


def _apply_rotary(q, k, cos, sin) -> str:
    return f"{dtype_name(q.dtype)},head_dim={q.shape[-1]},heads={q.shape[1]}/{k.shape[1]}"


def _write_kv(k_pages, v_pages, k, v, slots) -> str:
    return f"{dtype_name(k_pages.dtype)},kv={k_pages.shape[2]}x{k_pages.shape[3]}"


def _decode_attention(q, k_pages, v_pages, tables, context_lens, window, scale) -> str:
    # The table width bounds the longest context without reading context_lens (no device sync).
    ctx = tables.shape[1] * k_pages.shape[1]
    groups = q.shape[1] // k_pages.shape[2]
    return (f"{dtype_name(q.dtype)},head_dim={q.shape[-1]},groups={groups},"
            f"batch<={bucket(q.shape[0])},ctx<={bucket(ctx)}")


def _lora_delta(y, x, groups) -> str:
    rank = max((a.shape[0] for _, a, _, _ in groups), default=1)
    rows = sum(int(r.shape[0]) for r, _, _, _ in groups)
    return (f"{dtype_name(x.dtype)},in={x.shape[-1]},out={y.shape[-1]},"
            f"rank<={bucket(rank)},rows<={bucket(max(rows, 1))}")


_CLASSES: dict[str, Callable[..., str]] = {
    "rms_norm": _rms_norm, "add_rms_norm": _add_rms_norm, "silu_mul": _silu_mul, "apply_rotary": _apply_rotary,
    "write_kv": _write_kv, "decode_attention": _decode_attention, "lora_delta": _lora_delta,
}


def shape_class(op: str, *args: Any) -> str:
    """The tuning key of one call of `op`; ``"*"`` for ops that are not tuned per shape."""
    fn = _CLASSES.get(op)
    return fn(*args) if fn else "*"
