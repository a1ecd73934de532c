"""FX-traceable Llama-family model (Llama, Mistral, Qwen2), built from planc's three block kinds.

Parameter names match Hugging Face checkpoints (``model.layers.0.self_attn.q_proj.weight``), so a
checkpoint loads without renaming. The ops go through ``planc.kernels`` and are wrapped as FX leaf
functions: a traced graph shows ``rms_norm``/``attention`` as single nodes the cost model can read.

>>> import torch
>>> from planc.models.llama import CausalLM
>>> from planc.models.config import parse_arch
>>> cfg = parse_arch({"model_type": "llama", "vocab_size": 32, "hidden_size": 16, "intermediate_size": 32,
...                   "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}, "config.json")
>>> CausalLM(cfg)(torch.tensor([[1, 2, 3]])).shape
torch.Size([1, 3, 32])
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.fx
from torch import nn

from planc import kernels
from planc.models.config import ArchConfig

# FX leaf functions: traced as one call_function node each, implementation chosen at run time.
rms_norm = torch.fx.wrap(kernels.rms_norm)
silu_mul = torch.fx.wrap(kernels.silu_mul)
apply_rotary = torch.fx.wrap(kernels.apply_rotary)
attention = torch.fx.wrap(kernels.attention)
rope_cos_sin = torch.fx.wrap(kernels.rope_cos_sin)


def _embedding(num: int, dim: int) -> nn.Embedding:
    # Passing the weight skips nn.Embedding's random init, which on the meta device costs a 2 s
    # torch._dynamo import; checkpoints overwrite the values anyway.
    return nn.Embedding(num, dim, _weight=torch.empty(num, dim))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, cfg: ArchConfig, layer_idx: int):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.window = cfg.sliding_windows[layer_idx]
        self.scale = cfg.head_dim ** -0.5
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=cfg.o_bias)
        inv_freq, self.rope_scaling = cfg.rope.inv_freq(cfg.head_dim)
        # Derived from config.json, not stored in checkpoints; always real (also on a meta model).
        self.register_buffer("inv_freq", inv_freq.to("cpu"), persistent=False)

    def forward(self, x: torch.Tensor, positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        # x: (batch, seq, hidden)
        batch, seq = x.shape[0], x.shape[1]
        q = self.q_proj(x).view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if positions is None:
            positions = torch.arange(seq, device=x.device)
        cos, sin = rope_cos_sin(positions, self.inv_freq, self.rope_scaling, x.dtype)
        q, k = apply_rotary(q, k, cos, sin)
        out = attention(q, k, v, self.window, self.scale)  # (batch, heads, seq, head_dim)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, self.num_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: ArchConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_mul(self.gate_proj(x), self.up_proj(x)))


class DecoderLayer(nn.Module):
    """Block kind `layer`: pre-norm attention and MLP, each with a residual."""

    def __init__(self, cfg: ArchConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), positions)
        return x + self.mlp(self.post_attention_layernorm(x))


class EmbeddingBlock(nn.Module):
    """Block kind `embedding`: token ids (batch, seq) -> hidden (batch, seq, hidden)."""

    def __init__(self, cfg: ArchConfig):
        super().__init__()
        self.embed_tokens = _embedding(cfg.vocab_size, cfg.hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)


class HeadBlock(nn.Module):
    """Block kind `head`: final norm + lm_head. With tied embeddings lm_head.weight is the
    embedding block's tensor (the loader binds it; it is never stored twice)."""

    def __init__(self, cfg: ArchConfig):
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(x))


class Backbone(nn.Module):
    def __init__(self, cfg: ArchConfig):
        super().__init__()
        self.embed_tokens = _embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class CausalLM(nn.Module):
    """The whole model under Hugging Face's parameter names; what the trace pass traces."""

    def __init__(self, cfg: ArchConfig):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            h = layer(h)
        return self.lm_head(self.model.norm(h))


def build_model(cfg: ArchConfig, device: str | torch.device = "cpu", dtype: Optional[torch.dtype] = None) -> CausalLM:
    """A CausalLM with placeholder weights (load a checkpoint into it); ``device="meta"`` allocates nothing."""
    with torch.device(device):
        model = CausalLM(cfg)
    return model.to(dtype=dtype or cfg.torch_dtype) if str(device) != "meta" else model


def expected_tensors(cfg: ArchConfig) -> dict[str, tuple[torch.Size, bool]]:
    """Checkpoint tensor names -> (shape, required). lm_head.weight is optional when tied."""
    return dict(_expected_tensors(cfg))


@functools.lru_cache(maxsize=16)
def _expected_tensors(cfg: ArchConfig) -> tuple[tuple[str, tuple[torch.Size, bool]], ...]:
    model = build_model(cfg, device="meta")
    out = {name: (p.shape, True) for name, p in model.named_parameters(remove_duplicate=False)}
    if cfg.tie_word_embeddings:
        out["lm_head.weight"] = (out["lm_head.weight"][0], False)
    return tuple(out.items())
