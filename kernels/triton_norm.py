"""RMSNorm, alone and fused with the residual add that precedes it; torch references in reference.py.

One program per row. Pass 1 sums squares in fp32 (and, fused, stores x + residual); pass 2
normalizes. Rounding follows the reference: the normalized row is cast to the input dtype before
the weight multiply, as Hugging Face's Llama does.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from planc.kernels.triton_util import check_tensors, launch_options, pow2


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, sum_ptr, num_cols, x_stride, res_stride, out_stride,
                     sum_stride, eps, HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * x_stride
    res_row = res_ptr + row * res_stride
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, num_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < num_cols
        x = tl.load(x_row + cols, mask=mask, other=0.0)
        if HAS_RESIDUAL:
            # The sum is rounded to the storage dtype first: the reference adds in that dtype.
            x = (x.to(tl.float32) + tl.load(res_row + cols, mask=mask, other=0.0).to(tl.float32)).to(x.dtype)
            tl.store(sum_ptr + row * sum_stride + cols, x, mask=mask)
        xf = x.to(tl.float32)
        acc += xf * xf
    rstd = tl.math.rsqrt(tl.sum(acc, axis=0) / num_cols + eps)
    for start in range(0, num_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < num_cols
        # Recomputed rather than re-read from sum_ptr: no read-after-write across threads.
        x = tl.load(x_row + cols, mask=mask, other=0.0)
        if HAS_RESIDUAL:
            x = (x.to(tl.float32) + tl.load(res_row + cols, mask=mask, other=0.0).to(tl.float32)).to(x.dtype)
        normed = (x.to(tl.float32) * rstd).to(x.dtype).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * out_stride + cols, (w * normed).to(out_ptr.dtype.element_ty), mask=mask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(..., hidden) as (rows, hidden) with unit column stride (a copy only when unavoidable)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _defaults(num_cols: int, config: Optional[dict]) -> tuple[int, dict]:
    # A whole row in one block up to 8192 columns keeps pass 2's re-read in L1/L2.
    block = int((config or {}).get("BLOCK", min(pow2(num_cols, 16), 8192)))
    warps = min(16, max(1, block // 512))
    return block, launch_options(config, num_warps=warps, num_stages=1)


def _launch(x: torch.Tensor, residual: Optional[torch.Tensor], weight: torch.Tensor, eps: float,
            config: Optional[dict]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    op = "add_rms_norm" if residual is not None else "rms_norm"
    check_tensors(op, x, weight, *([residual] if residual is not None else []))
    num_cols = x.shape[-1]
    if weight.shape != (num_cols,) or (residual is not None and residual.shape != x.shape):
        raise ValueError(f"{op}: shapes x {tuple(x.shape)}, weight {tuple(weight.shape)} do not match")
    weight = weight.contiguous()
    x2 = _rows(x)
    res2 = _rows(residual) if residual is not None else x2
    out = torch.empty(x2.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    total = torch.empty_like(x2) if residual is not None else out
    if x2.shape[0] == 0:
        return out.view(x.shape), total.view(x.shape) if residual is not None else None
    block, opts = _defaults(num_cols, config)
    _rms_norm_kernel[(x2.shape[0],)](x2, res2, weight, out, total, num_cols, x2.stride(0), res2.stride(0),
                                     out.stride(0), total.stride(0), float(eps),
                                     HAS_RESIDUAL=residual is not None, BLOCK=block, **opts)
    return out.view(x.shape), total.view(x.shape) if residual is not None else None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, config: Optional[dict] = None) -> torch.Tensor:
    return _launch(x, None, weight, eps, config)[0]


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                 config: Optional[dict] = None) -> tuple[torch.Tensor, torch.Tensor]:
    if residual.dtype != x.dtype:
        raise ValueError(f"add_rms_norm: x is {x.dtype} but residual is {residual.dtype}")
    return _launch(x, residual, weight, eps, config)
