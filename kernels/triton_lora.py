"""Multi-adapter LoRA delta, SGMV-style; torch reference: reference.lora_delta.

`groups` holds one (rows, A (rank, in), B (out, rank), scale) per adapter. Rows are gathered by
adapter into one index; each adapter keeps its own A and B tensors (a table of their addresses is
passed to the kernel), so nothing is padded or copied to the largest rank: a rank-4 adapter's
programs read 4 rows of A, a rank-16 one's 16. Two launches for the whole batch:

- shrink: t[r] = x[row r] @ A_g.T      grid (adapter, row block)        t: (rows, BLOCK_R) fp32 scratch
- expand: y[row r] += s_g * t[r] @ B_g.T grid (adapter, row block, out block)
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from planc.kernels.triton_util import check_tensors, dot_options, launch_options, pow2


@triton.jit
def _shrink_kernel(x_ptr, t_ptr, rows_ptr, seg_ptr, a_ptrs, ranks_ptr, in_dim, x_s,
                   BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                   DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr):
    g = tl.program_id(0)
    seg_start = tl.load(seg_ptr + g)
    num_rows = tl.load(seg_ptr + g + 1) - seg_start
    if tl.program_id(1) * BLOCK_M >= num_rows:
        return  # adapters have different row counts; the grid fits the largest
    rank = tl.load(ranks_ptr + g)
    a_ptr = tl.load(a_ptrs + g).to(tl.pointer_type(x_ptr.dtype.element_ty))
    m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    mmask = m < num_rows
    rows = tl.load(rows_ptr + seg_start + m, mask=mmask, other=0).to(tl.int64)
    r = tl.arange(0, BLOCK_R)
    kk = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    for k0 in range(0, in_dim, BLOCK_K):
        k = k0 + kk
        x = tl.load(x_ptr + rows[:, None] * x_s + k[None, :], mask=mmask[:, None] & (k[None, :] < in_dim), other=0.0)
        # A is (rank, in) row-major; this tile is A.T[k, r], read only for r < this adapter's rank.
        a = tl.load(a_ptr + r[None, :] * in_dim + k[:, None], mask=(r[None, :] < rank) & (k[:, None] < in_dim),
                    other=0.0)
        if DOT_UPCAST:
            x, a = x.to(tl.float32), a.to(tl.float32)
        acc += tl.dot(x, a, input_precision=DOT_PRECISION)
    tl.store(t_ptr + (seg_start + m)[:, None] * BLOCK_R + r[None, :], acc, mask=mmask[:, None])


@triton.jit
def _expand_kernel(y_ptr, t_ptr, rows_ptr, seg_ptr, b_ptrs, ranks_ptr, scales_ptr, out_dim, y_s,
                   BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
                   DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr):
    g = tl.program_id(0)
    seg_start = tl.load(seg_ptr + g)
    num_rows = tl.load(seg_ptr + g + 1) - seg_start
    if tl.program_id(1) * BLOCK_M >= num_rows:
        return
    rank = tl.load(ranks_ptr + g)
    scale = tl.load(scales_ptr + g)
    b_ptr = tl.load(b_ptrs + g).to(tl.pointer_type(y_ptr.dtype.element_ty))
    m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    mmask = m < num_rows
    rows = tl.load(rows_ptr + seg_start + m, mask=mmask, other=0).to(tl.int64)
    r = tl.arange(0, BLOCK_R)
    n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < out_dim
    # The reference rounds x @ A.T to the storage dtype before B; so does this cast.
    t = tl.load(t_ptr + (seg_start + m)[:, None] * BLOCK_R + r[None, :], mask=mmask[:, None], other=0.0)
    t = t.to(y_ptr.dtype.element_ty)
    b = tl.load(b_ptr + n[None, :] * rank + r[:, None], mask=(r[:, None] < rank) & nmask[None, :], other=0.0)
    if DOT_UPCAST:
        t, b = t.to(tl.float32), b.to(tl.float32)
    delta = tl.dot(t, b, input_precision=DOT_PRECISION) * scale
    ptrs = y_ptr + rows[:, None] * y_s + n[None, :]
    ymask = mmask[:, None] & nmask[None, :]
    y = tl.load(ptrs, mask=ymask, other=0.0).to(tl.float32)
    tl.store(ptrs, (y + delta).to(y_ptr.dtype.element_ty), mask=ymask)


def _check(y: torch.Tensor, x: torch.Tensor, groups) -> None:
    check_tensors("lora_delta", y, x, *[t for grp in groups for t in grp[:3]])
    if x.dim() != 2 or y.dim() != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"lora_delta: x {tuple(x.shape)} and y {tuple(y.shape)} must be (tokens, dim) alike")
    if y.stride(1) != 1:
        raise ValueError("lora_delta: y is updated in place and needs unit column stride")
    for rows, a, b, _ in groups:
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != x.shape[1] or b.shape != (y.shape[1], a.shape[0]):
            raise ValueError(f"lora_delta: A {tuple(a.shape)} / B {tuple(b.shape)} do not fit x {tuple(x.shape)} "
                             f"-> y {tuple(y.shape)}")
        if a.dtype != x.dtype or b.dtype != y.dtype or rows.is_floating_point():
            raise ValueError("lora_delta: A must have x's dtype, B y's dtype, and rows must be integers")


def _metadata(groups, device: torch.device):
    """Row index grouped by adapter and per-adapter tables; contiguous A/B copies are kept alive by the caller."""
    weights = [(a.contiguous(), b.contiguous()) for _, a, b, _ in groups]
    rows = torch.cat([r.reshape(-1) for r, _, _, _ in groups]).to(device=device, dtype=torch.int32)
    counts = [int(r.numel()) for r, _, _, _ in groups]
    seg = torch.tensor([0] + counts, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    host = {"seg": seg, "ranks": torch.tensor([a.shape[0] for a, _ in weights], dtype=torch.int32),
            "a": torch.tensor([a.data_ptr() for a, _ in weights], dtype=torch.int64),
            "b": torch.tensor([b.data_ptr() for _, b in weights], dtype=torch.int64),
            "scales": torch.tensor([float(s) for _, _, _, s in groups], dtype=torch.float32)}
    meta = {k: v.to(device, non_blocking=True) for k, v in host.items()}
    return weights, rows, meta, max(counts)


def lora_delta(y: torch.Tensor, x: torch.Tensor, groups, config: Optional[dict] = None) -> torch.Tensor:
    # y: (tokens, out) updated in place; x: (tokens, in)
    if not groups:
        return y
    _check(y, x, groups)
    x = x if x.stride(1) == 1 else x.contiguous()
    weights, rows, meta, most_rows = _metadata(groups, y.device)
    if rows.numel() == 0:
        return y
    cfg = config or {}
    block_r = pow2(max(a.shape[0] for a, _ in weights), 16)  # tl.dot tiles are >= 16 on each side
    block_m = int(cfg.get("BLOCK_M", 16))
    block_k = int(cfg.get("BLOCK_K", 64))
    block_n = int(cfg.get("BLOCK_N", 64))
    t = torch.empty(rows.numel(), block_r, dtype=torch.float32, device=y.device)
    dots = dot_options(x.dtype)
    opts = launch_options(cfg, num_warps=4, num_stages=2)
    num_groups, m_blocks = len(groups), triton.cdiv(most_rows, block_m)
    _shrink_kernel[(num_groups, m_blocks)](x, t, rows, meta["seg"], meta["a"], meta["ranks"], x.shape[1], x.stride(0),
                                           BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_K=block_k, **dots, **opts)
    grid = (num_groups, m_blocks, triton.cdiv(y.shape[1], block_n))
    _expand_kernel[grid](y, t, rows, meta["seg"], meta["b"], meta["ranks"], meta["scales"], y.shape[1], y.stride(0),
                         BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_N=block_n, **dot_options(y.dtype), **opts)
    del weights  # the launches above read them by address; they must live until here (stream-ordered frees)
    return y
