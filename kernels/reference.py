"""Torch reference implementations: the oracle every faster kernel is tested against.

The arithmetic follows Hugging Face's Llama/Mistral/Qwen2 code step for step (fp32 norm
statistics, fp32 rotary angles) so that planc's outputs match transformers to fp32 rounding.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x32 = x.to(torch.float32)
    variance = x32.pow(2).mean(-1, keepdim=True)
    return weight * (x32 * torch.rsqrt(variance + eps)).to(dtype)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual): the residual add and the next norm in one op."""
    total = x + residual
    return rms_norm(total, weight, eps), total


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, scaling: float, dtype: torch.dtype):
    """cos/sin of shape (..., seq, head_dim) for integer positions (..., seq)."""
    freqs = positions[..., None].float() * inv_freq.to(device=positions.device, dtype=torch.float32)
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * scaling).to(dtype), (emb.sin() * scaling).to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    # q: (batch, heads, seq, head_dim); cos/sin: (seq, head_dim) or (batch, seq, head_dim)
    if cos.dim() == 3:
        cos, sin = cos[:, None], sin[:, None]
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: Optional[int], scale: float) -> torch.Tensor:
    # q: (batch, heads, seq, head_dim); k, v: (batch, kv_heads, seq, head_dim)
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    if window is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    seq = q.shape[2]
    i = torch.arange(seq, device=q.device)[:, None]
    j = torch.arange(seq, device=q.device)[None, :]
    mask = (j <= i) & (i - j < window)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_positions: torch.Tensor,
                    window: Optional[int], scale: float) -> torch.Tensor:
    """Attention of one sequence's new queries over its cached keys/values.

    q: (new_tokens, heads, head_dim) at absolute positions `q_positions` (new_tokens,);
    k, v: (context, kv_heads, head_dim) for positions 0..context-1 (the new tokens included).
    Returns (new_tokens, heads, head_dim).
    """
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    j = torch.arange(k.shape[0], device=q.device)[None, :]
    i = q_positions[:, None]
    mask = j <= i
    if window is not None:
        mask = mask & (i - j < window)
    out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                         attn_mask=mask, scale=scale)
    return out[0].transpose(0, 1)


def lora_delta(y: torch.Tensor, x: torch.Tensor,
               groups: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]]) -> torch.Tensor:
    """Add each adapter's delta to its rows, in place: y[rows] += scale * x[rows] @ A.T @ B.T.

    `groups` holds one (rows, A (rank, in), B (out, rank), scale) per adapter; adapters of different
    ranks share one call (SGMV-style: grouped by adapter, no padding to the largest rank).
    """
    for rows, a, b, scale in groups:
        y.index_add_(0, rows, (x[rows] @ a.t() @ b.t()) * scale)
    return y


def decode_attention(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor, tables: torch.Tensor,
                     context_lens: torch.Tensor, window: Optional[int], scale: float,
                     max_gather_bytes: int = 16 * 2**20) -> torch.Tensor:
    """One new query per sequence over its paged keys/values, for a whole batch in one call.

    q: (seqs, heads, head_dim); k_pages, v_pages: (pages, page_size, kv_heads, head_dim);
    tables: (seqs, max_pages) page ids; context_lens: (seqs,) tokens in cache, the new one included.
    Returns (seqs, heads, head_dim).

    The keys and values are gathered into contiguous tensors, so sequences go in slices of at most
    `max_gather_bytes` of gathered K/V: a step's memory stays bounded whatever the batch and context.
    Query heads are grouped over their KV head instead of repeating K/V per query head (GQA).
    """
    seqs, ctx = q.shape[0], int(context_lens.max())
    per_seq = 2 * ctx * k_pages.shape[2] * k_pages.shape[3] * k_pages.element_size()
    step = max(1, max_gather_bytes // per_seq)
    if seqs > step:
        return torch.cat([decode_attention(q[i:i + step], k_pages, v_pages, tables[i:i + step],
                                           context_lens[i:i + step], window, scale, max_gather_bytes)
                          for i in range(0, seqs, step)])
    page_size, kv_heads, head_dim = k_pages.shape[1], k_pages.shape[2], k_pages.shape[3]
    j = torch.arange(ctx, device=q.device)
    pages = tables.gather(1, (j // page_size).expand(seqs, -1))               # (seqs, ctx)
    k = k_pages[pages, j % page_size].float()                                 # (seqs, ctx, kv_heads, head_dim)
    v = v_pages[pages, j % page_size].float()
    pos = (context_lens - 1)[:, None]                                          # the query's position
    mask = j[None, :] <= pos
    if window is not None:
        mask = mask & (pos - j[None, :] < window)
    qg = q.float().view(seqs, kv_heads, q.shape[1] // kv_heads, head_dim)      # heads grouped by KV head
    scores = torch.einsum("skgd,sckd->skgc", qg, k) * scale
    scores = scores.masked_fill(~mask[:, None, None, :], float("-inf")).softmax(-1)
    out = torch.einsum("skgc,sckd->skgd", scores, v)
    return out.reshape(seqs, -1, head_dim).to(q.dtype)


def write_kv(k_pages: torch.Tensor, v_pages: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slots: torch.Tensor) -> None:
    """Store new keys/values in the paged cache, in place.

    k_pages, v_pages: (pages, page_size, kv_heads, head_dim); k, v: (tokens, kv_heads, head_dim);
    slots: (tokens,) flat slot of each token, page * page_size + offset within the page.
    """
    page_size = k_pages.shape[1]
    pages, offsets = slots // page_size, slots % page_size
    k_pages[pages, offsets] = k.to(k_pages.dtype)
    v_pages[pages, offsets] = v.to(v_pages.dtype)
