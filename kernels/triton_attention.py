"""Decode attention over the runtime's paged KV cache; torch reference: reference.decode_attention.

Layout (kv_cache.py): k_pages, v_pages (pages, page_size, kv_heads, head_dim); tables (seqs,
max_pages) page ids; context_lens (seqs,) tokens in cache, the new one included; the query of
sequence s sits at position context_lens[s] - 1.

One program per (sequence, kv head, context split) attends all the query heads that share the kv
head (grouped-query: K/V are read once per group, not once per query head), over its slice of the
context with an online softmax. Short batches with long contexts split the context (split-K /
flash-decoding) so the GPU has enough programs; a second kernel merges the splits' partial results.
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import torch
import triton
import triton.language as tl

from planc.kernels.triton_util import check_tensors, dot_options, launch_options, pow2


@triton.jit
def _decode_partial_kernel(q_ptr, k_cache, v_cache, tables, ctx_lens, out_ptr, m_ptr, l_ptr, acc_ptr,
                           scale_log2, window, q_s, q_h, t_s, c_p, c_ps, c_h, o_s, o_h, num_heads,
                           GROUPS: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr,
                           BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                           NUM_SPLITS: tl.constexpr, HAS_WINDOW: tl.constexpr,
                           DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr):
    seq = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(ctx_lens + seq).to(tl.int32)
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(ctx - window, 0)
    per_split = tl.cdiv(tl.cdiv(ctx - lo, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = lo + split * per_split
    end = tl.minimum(start + per_split, ctx)

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    heads = kvh * GROUPS + g
    qmask = (g[:, None] < GROUPS) & (d[None, :] < HEAD_DIM)
    q = tl.load(q_ptr + seq * q_s + heads[:, None] * q_h + d[None, :], mask=qmask, other=0.0)
    if DOT_UPCAST:
        q = q.to(tl.float32)
    m = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    for j0 in range(start, end, BLOCK_N):
        j = j0 + tl.arange(0, BLOCK_N)
        jmask = j < end
        page = tl.load(tables + seq * t_s + j // PAGE_SIZE, mask=jmask, other=0).to(tl.int64)
        rows = page * c_p + (j % PAGE_SIZE) * c_ps + kvh * c_h
        kvmask = jmask[:, None] & (d[None, :] < HEAD_DIM)
        k = tl.load(k_cache + rows[:, None] + d[None, :], mask=kvmask, other=0.0)
        v = tl.load(v_cache + rows[:, None] + d[None, :], mask=kvmask, other=0.0)
        if DOT_UPCAST:
            k, v = k.to(tl.float32), v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2  # (BLOCK_G, BLOCK_N), log2 units
        s = tl.where(jmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m = m_new

    if NUM_SPLITS == 1:
        out = acc / l[:, None]
        tl.store(out_ptr + seq * o_s + heads[:, None] * o_h + d[None, :], out.to(out_ptr.dtype.element_ty), mask=qmask)
    else:
        # Scratch is (seqs, heads, splits[, head_dim]) fp32; an empty split leaves m=-inf, l=0.
        row = (seq * num_heads + heads) * NUM_SPLITS + split
        tl.store(m_ptr + row, m, mask=g < GROUPS)
        tl.store(l_ptr + row, l, mask=g < GROUPS)
        tl.store(acc_ptr + row[:, None] * HEAD_DIM + d[None, :], acc, mask=qmask)


@triton.jit
def _decode_combine_kernel(m_ptr, l_ptr, acc_ptr, out_ptr, o_s, o_h, num_heads,
                           HEAD_DIM: tl.constexpr, NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr,
                           BLOCK_D: tl.constexpr):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    sp = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    smask = sp < NUM_SPLITS
    row = (seq * num_heads + head) * NUM_SPLITS + sp
    m = tl.load(m_ptr + row, mask=smask, other=float("-inf"))
    l = tl.load(l_ptr + row, mask=smask, other=0.0)
    acc = tl.load(acc_ptr + row[:, None] * HEAD_DIM + d[None, :], mask=smask[:, None] & (d[None, :] < HEAD_DIM),
                  other=0.0)
    w = tl.exp2(m - tl.max(m, axis=0))  # every sequence has >= 1 token, so the max is finite
    out = tl.sum(w[:, None] * acc, axis=0) / tl.sum(w * l, axis=0)
    tl.store(out_ptr + seq * o_s + head * o_h + d, out.to(out_ptr.dtype.element_ty), mask=d < HEAD_DIM)


def _check(q, k_pages, v_pages, tables, context_lens) -> None:
    check_tensors("decode_attention", q, k_pages, v_pages, tables, context_lens)
    seqs, heads, dim = q.shape
    if k_pages.shape != v_pages.shape or k_pages.dim() != 4 or k_pages.shape[3] != dim:
        raise ValueError(f"decode_attention: pages {tuple(k_pages.shape)} / {tuple(v_pages.shape)} do not fit "
                         f"q {tuple(q.shape)}")
    if heads % k_pages.shape[2]:
        raise ValueError(f"decode_attention: {heads} query heads are not a multiple of {k_pages.shape[2]} kv heads")
    if not (k_pages.is_contiguous() and v_pages.is_contiguous()) or q.dtype != k_pages.dtype:
        raise ValueError("decode_attention: page pools must be contiguous and of the query's dtype")
    if tables.dim() != 2 or tables.shape[0] != seqs or context_lens.shape != (seqs,):
        raise ValueError(f"decode_attention: tables {tuple(tables.shape)} / context_lens {tuple(context_lens.shape)} "
                         f"do not match {seqs} sequences")
    if tables.is_floating_point() or context_lens.is_floating_point():
        raise ValueError("decode_attention: tables and context_lens must be integer tensors")


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _num_splits(programs: int, max_ctx: int, block_n: int, device: torch.device) -> int:
    """Enough context splits to give every SM about two programs, each split >= 256 tokens."""
    if device.type != "cuda":
        return 1
    sms = _num_sms(device.index if device.index is not None else torch.cuda.current_device())
    want = triton.cdiv(2 * sms, max(programs, 1))
    return max(1, min(want, triton.cdiv(max_ctx, max(block_n, 256))))


def decode_attention(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor, tables: torch.Tensor,
                     context_lens: torch.Tensor, window: Optional[int], scale: float,
                     config: Optional[dict] = None) -> torch.Tensor:
    # q: (seqs, heads, head_dim) -> (seqs, heads, head_dim)
    _check(q, k_pages, v_pages, tables, context_lens)
    seqs, heads, dim = q.shape
    page_size, kv_heads = k_pages.shape[1], k_pages.shape[2]
    groups = heads // kv_heads
    q = q if q.stride(2) == 1 else q.contiguous()
    tables, context_lens = tables.contiguous(), context_lens.contiguous()
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if seqs == 0:
        return out
    cfg = config or {}
    block_n = int(cfg.get("BLOCK_N", 64 if dim <= 128 else 32))
    max_ctx = tables.shape[1] * page_size  # bound without reading context_lens (no device sync)
    splits = int(cfg.get("num_splits") or _num_splits(seqs * kv_heads, max_ctx, block_n, q.device))
    splits = max(1, min(splits, triton.cdiv(max_ctx, block_n)))
    scratch = [torch.empty(0, device=q.device)] * 3
    if splits > 1:
        scratch = [torch.empty(seqs, heads, splits, device=q.device, dtype=torch.float32),
                   torch.empty(seqs, heads, splits, device=q.device, dtype=torch.float32),
                   torch.empty(seqs, heads, splits, dim, device=q.device, dtype=torch.float32)]
    opts = launch_options(cfg, num_warps=4, num_stages=2)
    # tl.dot needs every tile side >= 16; padded query rows of a small group are masked.
    _decode_partial_kernel[(seqs, kv_heads, splits)](
        q, k_pages, v_pages, tables, context_lens, out, *scratch, scale * math.log2(math.e),
        int(window or 0), q.stride(0), q.stride(1), tables.stride(0), k_pages.stride(0), k_pages.stride(1),
        k_pages.stride(2), out.stride(0), out.stride(1), heads,
        GROUPS=groups, HEAD_DIM=dim, PAGE_SIZE=page_size, BLOCK_G=pow2(groups, 16), BLOCK_N=block_n,
        BLOCK_D=pow2(dim, 16), NUM_SPLITS=splits, HAS_WINDOW=window is not None, **dot_options(q.dtype), **opts)
    if splits > 1:
        _decode_combine_kernel[(seqs, heads)](*scratch, out, out.stride(0), out.stride(1), heads, HEAD_DIM=dim,
                                              NUM_SPLITS=splits, BLOCK_S=pow2(splits), BLOCK_D=pow2(dim),
                                              num_warps=1)
    return out
