"""Memory-bound elementwise kernels: SwiGLU's silu(gate) * up, rotary on q and k, and the paged K/V write.

Torch references in reference.py. Each wrapper checks layout and picks block sizes; kernels read
strides they are given, so the runtime's transposed views need no copies.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from planc.kernels.triton_util import check_tensors, launch_options, pow2


# ---------------------------------------------------------------------------------------- SwiGLU
@triton.jit
def _silu_mul_kernel(gate_ptr, up_ptr, out_ptr, num_elements, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < num_elements
    g = tl.load(gate_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    # silu is rounded to the storage dtype before the product, as the reference's two ops do.
    s = (g / (1.0 + tl.exp(-g))).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + offs, (s * u).to(out_ptr.dtype.element_ty), mask=mask)


def silu_mul(gate: torch.Tensor, up: torch.Tensor, config: Optional[dict] = None) -> torch.Tensor:
    check_tensors("silu_mul", gate, up)
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"silu_mul: gate {tuple(gate.shape)} {gate.dtype} and up {tuple(up.shape)} {up.dtype} differ")
    gate, up = gate.contiguous(), up.contiguous()
    out = torch.empty_like(gate)
    n = gate.numel()
    if n == 0:
        return out
    block = int((config or {}).get("BLOCK", 1024))
    _silu_mul_kernel[(triton.cdiv(n, block),)](gate, up, out, n, BLOCK=block, **launch_options(config, num_warps=4))
    return out


# ---------------------------------------------------------------------------------------- rotary
@triton.jit
def _rotary_kernel(x_ptr, out_ptr, cos_ptr, sin_ptr, seq_len, num_heads,
                   xs_b, xs_h, xs_s, os_b, os_h, os_s, cs_b, cs_s,
                   HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    # One program per (batch, position) and block of heads: cos/sin are loaded once for all heads.
    pos = tl.program_id(0)
    b = pos // seq_len
    s = pos % seq_len
    d = tl.arange(0, BLOCK_D)
    dmask = d < HALF
    c_row = cos_ptr + b * cs_b + s * cs_s
    s_row = sin_ptr + b * cs_b + s * cs_s
    cos1 = tl.load(c_row + d, mask=dmask, other=0.0).to(tl.float32)
    cos2 = tl.load(c_row + HALF + d, mask=dmask, other=0.0).to(tl.float32)
    sin1 = tl.load(s_row + d, mask=dmask, other=0.0).to(tl.float32)
    sin2 = tl.load(s_row + HALF + d, mask=dmask, other=0.0).to(tl.float32)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = (h[:, None] < num_heads) & dmask[None, :]
    src = x_ptr + b * xs_b + s * xs_s + h[:, None] * xs_h + d[None, :]
    dst = out_ptr + b * os_b + s * os_s + h[:, None] * os_h + d[None, :]
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    # rotate_half pairs element i with i + HALF: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin).
    tl.store(dst, (x1 * cos1[None, :] - x2 * sin1[None, :]).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + HALF, (x2 * cos2[None, :] + x1 * sin2[None, :]).to(out_ptr.dtype.element_ty), mask=mask)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, config: Optional[dict]) -> torch.Tensor:
    batch, heads, seq, dim = x.shape
    if x.stride(3) != 1:
        x = x.contiguous()
    out = torch.empty_like(x)  # keeps x's strides (the runtime's transposed views stay as they are)
    cs_b = cos.stride(0) if cos.dim() == 3 else 0
    cs_s = cos.stride(-2)
    block_h = int((config or {}).get("BLOCK_H", min(pow2(heads), 16)))
    grid = (batch * seq, triton.cdiv(heads, block_h))
    _rotary_kernel[grid](x, out, cos, sin, seq, heads, x.stride(0), x.stride(1), x.stride(2),
                         out.stride(0), out.stride(1), out.stride(2), cs_b, cs_s,
                         HALF=dim // 2, BLOCK_H=block_h, BLOCK_D=pow2(dim // 2),
                         **launch_options(config, num_warps=4 if block_h * dim >= 2048 else 2))
    return out


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 config: Optional[dict] = None) -> tuple[torch.Tensor, torch.Tensor]:
    # q: (batch, heads, seq, head_dim); k: (batch, kv_heads, seq, head_dim); cos/sin (seq | batch, seq, head_dim)
    check_tensors("apply_rotary", q, k, cos, sin)
    dim = q.shape[-1]
    if q.dim() != 4 or k.dim() != 4 or dim % 2 or k.shape[-1] != dim:
        raise ValueError(f"apply_rotary: q {tuple(q.shape)} and k {tuple(k.shape)} must be 4-D with one even head_dim")
    if cos.shape != sin.shape or cos.shape[-1] != dim or cos.dim() not in (2, 3):
        raise ValueError(f"apply_rotary: cos/sin {tuple(cos.shape)} must be (seq | batch, seq, {dim})")
    if cos.stride(-1) != 1 or sin.stride() != cos.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    if cos.dim() == 3 and cos.shape[0] != q.shape[0]:
        cos, sin = cos.expand(q.shape[0], -1, -1), sin.expand(q.shape[0], -1, -1)
    return _rotate(q, cos, sin, config), _rotate(k, cos, sin, config)


# ---------------------------------------------------------------------------------------- paged K/V write
@triton.jit
def _write_kv_kernel(k_ptr, v_ptr, k_cache, v_cache, slot_ptr, num_heads, k_s, k_h, v_s, v_h,
                     HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    token = tl.program_id(0)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    mask = (h[:, None] < num_heads) & (d[None, :] < HEAD_DIM)
    # The cache is contiguous: a slot's (kv_heads, head_dim) values are one run of memory.
    dst = slot * num_heads * HEAD_DIM + h[:, None] * HEAD_DIM + d[None, :]
    k = tl.load(k_ptr + token * k_s + h[:, None] * k_h + d[None, :], mask=mask)
    v = tl.load(v_ptr + token * v_s + h[:, None] * v_h + d[None, :], mask=mask)
    tl.store(k_cache + dst, k.to(k_cache.dtype.element_ty), mask=mask)
    tl.store(v_cache + dst, v.to(v_cache.dtype.element_ty), mask=mask)


def write_kv(k_pages: torch.Tensor, v_pages: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor,
             config: Optional[dict] = None) -> None:
    check_tensors("write_kv", k_pages, v_pages, k, v, slots)
    if not (k_pages.is_contiguous() and v_pages.is_contiguous() and k_pages.shape == v_pages.shape):
        raise ValueError("write_kv: the K and V page pools must be contiguous and of one shape")
    heads, dim = k_pages.shape[2], k_pages.shape[3]
    if k.shape != v.shape or k.shape[1:] != (heads, dim) or slots.shape != (k.shape[0],):
        raise ValueError(f"write_kv: k {tuple(k.shape)}, v {tuple(v.shape)}, slots {tuple(slots.shape)} "
                         f"do not fit pages of (.., {heads}, {dim})")
    if k.shape[0] == 0:
        return
    if k.stride(2) != 1 or v.stride(2) != 1:
        k, v = k.contiguous(), v.contiguous()
    _write_kv_kernel[(k.shape[0],)](k, v, k_pages, v_pages, slots.contiguous(), heads, k.stride(0), k.stride(1),
                                    v.stride(0), v.stride(1), HEAD_DIM=dim, BLOCK_H=pow2(heads), BLOCK_D=pow2(dim),
                                    **launch_options(config, num_warps=4 if heads * dim >= 1024 else 1))
