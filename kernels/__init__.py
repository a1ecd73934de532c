"""Ops of the block-chain runtime behind one dispatch point.

Model and runtime code call ``planc.kernels.rms_norm`` and friends; the current
:class:`KernelSelection` decides which implementation runs (see ``dispatch``): Triton kernels on
CUDA tensors when Triton is installed, the torch references (``planc.kernels.reference``, the
oracle every kernel is tested against) otherwise. ``import planc.kernels`` never imports Triton.

>>> import torch, planc.kernels as K
>>> K.rms_norm(torch.ones(2, 4), torch.ones(4), 1e-6).shape
torch.Size([2, 4])
>>> with K.use_kernels(K.KernelSelection.parse("rms_norm=torch")):
...     K.rms_norm(torch.ones(1, 4), torch.ones(4), 1e-6).tolist()
[[1.0, 1.0, 1.0, 1.0]]
"""
from __future__ import annotations

from planc.kernels.dispatch import (OPS, KernelRegistry, KernelSelection, current, triton_available,
                                    use_kernels)
from planc.kernels.reference import rope_cos_sin
from planc.kernels.tuned import load_tuned

__all__ = ["OPS", "KernelRegistry", "KernelSelection", "current", "use_kernels", "triton_available", "load_tuned",
           "rms_norm", "add_rms_norm", "silu_mul", "apply_rotary", "attention", "paged_attention",
           "decode_attention", "write_kv", "lora_delta", "rope_cos_sin"]


def rms_norm(x, weight, eps: float):
    """RMSNorm over the last dim, computed in fp32 and cast back, as HF Llama does."""
    return current().call("rms_norm", x, weight, eps)


def add_rms_norm(x, residual, weight, eps: float):
    """(rms_norm(x + residual), x + residual): a residual add fused with the norm that follows it."""
    return current().call("add_rms_norm", x, residual, weight, eps)


def silu_mul(gate, up):
    """SwiGLU's elementwise part: silu(gate) * up."""
    return current().call("silu_mul", gate, up)


def apply_rotary(q, k, cos, sin):
    """Rotary embedding on q (batch, heads, seq, head_dim) and k (batch, kv_heads, seq, head_dim)."""
    return current().call("apply_rotary", q, k, cos, sin)


def attention(q, k, v, window, scale: float):
    """Causal (optionally sliding-window) grouped-query attention over a full sequence."""
    return current().call("attention", q, k, v, window, scale)


def paged_attention(q, k, v, q_positions, window, scale: float):
    """One sequence's new queries (tokens, heads, head_dim) over its cached keys/values."""
    return current().call("paged_attention", q, k, v, q_positions, window, scale)


def lora_delta(y, x, groups):
    """Add grouped multi-adapter LoRA deltas to `y` in place (see reference.lora_delta)."""
    return current().call("lora_delta", y, x, groups)


def decode_attention(q, k_pages, v_pages, tables, context_lens, window, scale: float):
    """One query per sequence over its paged KV cache, the whole batch in one call."""
    return current().call("decode_attention", q, k_pages, v_pages, tables, context_lens, window, scale)


def write_kv(k_pages, v_pages, k, v, slots):
    """Store new keys/values (tokens, kv_heads, head_dim) at flat `slots` of the paged cache, in place."""
    return current().call("write_kv", k_pages, v_pages, k, v, slots)
