"""Ops of the block-chain runtime behind one dispatch point.

Model code calls ``planc.kernels.rms_norm`` and friends; which implementation runs is decided
here, so Triton versions plug in without touching the model code. Today every op has its torch
reference (``planc.kernels.reference``); Triton is never imported by ``import planc``.

>>> import torch, planc.kernels as K
>>> K.rms_norm(torch.ones(2, 4), torch.ones(4), 1e-6).shape
torch.Size([2, 4])
"""
from __future__ import annotations

from planc.kernels.dispatch import KernelRegistry, default_registry
from planc.kernels.reference import rope_cos_sin

__all__ = ["KernelRegistry", "default_registry", "rms_norm", "silu_mul", "apply_rotary", "attention",
           "paged_attention", "decode_attention", "lora_delta", "rope_cos_sin"]


def rms_norm(x, weight, eps: float):
    """RMSNorm over the last dim, computed in fp32 and cast back, as HF Llama does."""
    return default_registry.impl("rms_norm")(x, weight, eps)


def silu_mul(gate, up):
    """SwiGLU's elementwise part: silu(gate) * up."""
    return default_registry.impl("silu_mul")(gate, up)


def apply_rotary(q, k, cos, sin):
    """Rotary embedding on q (batch, heads, seq, head_dim) and k (batch, kv_heads, seq, head_dim)."""
    return default_registry.impl("apply_rotary")(q, k, cos, sin)


def attention(q, k, v, window, scale: float):
    """Causal (optionally sliding-window) grouped-query attention over a full sequence."""
    return default_registry.impl("attention")(q, k, v, window, scale)


def paged_attention(q, k, v, q_positions, window, scale: float):
    """One sequence's new queries (tokens, heads, head_dim) over its cached keys/values."""
    return default_registry.impl("paged_attention")(q, k, v, q_positions, window, scale)


def lora_delta(y, x, groups):
    """Add grouped multi-adapter LoRA deltas to `y` in place (see reference.lora_delta)."""
    return default_registry.impl("lora_delta")(y, x, groups)


def decode_attention(q, k_pages, v_pages, tables, context_lens, window, scale: float):
    """One query per sequence over its paged KV cache, the whole batch in one call."""
    return default_registry.impl("decode_attention")(q, k_pages, v_pages, tables, context_lens, window, scale)
