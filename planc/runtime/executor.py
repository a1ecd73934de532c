"""Run one block on a ragged batch of sequences from many variants (per-block batching).

A batch is the tokens of several sequences laid end to end: hidden (tokens, hidden). Each
sequence contributes a segment (its new tokens: the whole prompt at prefill, one token at decode)
with absolute positions. Matmuls run once over all tokens of the group; attention runs per
sequence over its paged KV; LoRA deltas are added per adapter on the rows of the sequences that
use it (SGMV-style grouping: one pair of small matmuls per adapter, not per sequence).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

import torch
from torch import nn

from planc import kernels
from planc.models.llama import DecoderLayer, EmbeddingBlock, HeadBlock
from planc.runtime.kv_cache import KVCache

if TYPE_CHECKING:
    from planc.runtime.tensor_parallel import TensorParallel


@dataclass
class Segment:
    """One sequence's slice of a ragged batch."""

    seq: int
    start: int
    """Offset of its first token in the batch."""
    length: int
    """Number of new tokens."""
    position: int
    """Absolute position of its first new token (= tokens already in the KV cache)."""
    adapter: Optional[str] = None


@dataclass
class RaggedBatch:
    segments: list[Segment]
    positions: torch.Tensor = field(init=False)
    """(tokens,) absolute position of every token."""

    adapter_rows: dict[str, torch.Tensor] = field(init=False)
    """adapter key -> rows of the sequences that use it (computed once; every Linear of the block reads it)."""

    def __post_init__(self) -> None:
        self.positions = torch.cat([torch.arange(s.position, s.position + s.length) for s in self.segments])
        rows: dict[str, list[torch.Tensor]] = {}
        for s in self.segments:
            if s.adapter is not None:
                rows.setdefault(s.adapter, []).append(torch.arange(s.start, s.start + s.length))
        self.adapter_rows = {adapter: torch.cat(r) for adapter, r in rows.items()}

    def rows(self, start: int, end: int) -> "BatchRows":
        """Rows start..end of the batch, as `linear` sees them (each adapter's rows renumbered from 0)."""
        picked = {a: r[(r >= start) & (r < end)] - start for a, r in self.adapter_rows.items()}
        return BatchRows({a: r for a, r in picked.items() if len(r)})

    def last_rows(self) -> torch.Tensor:
        return torch.tensor([s.start + s.length - 1 for s in self.segments])


@dataclass
class BatchRows:
    """A contiguous range of a batch's rows: what `linear` needs to add adapter deltas on them."""

    adapter_rows: dict[str, torch.Tensor]


MLP_CHUNK_ROWS = 256
"""Rows the MLP runs at once. Its (rows, intermediate) tensors are the largest a step allocates (4 of
them live at once: gate, up, silu(gate), the product); at a 512-token prefill chunk of the 100M example
that is 16 MiB, and it sets the server's peak memory. 256 rows still run the matmuls at full speed on
a CPU (compute-bound from about 8 rows). On a GPU the MLP runs whole: a step's activations are small
against its memory, and wider matmuls run closer to peak."""


AdapterTensors = dict[str, tuple[torch.Tensor, torch.Tensor, float]]
"""module path inside the block (self_attn.q_proj) -> (A (rank, in), B (out, rank), scaling)."""


def linear(module: nn.Linear, x: torch.Tensor, path: str, batch: RaggedBatch | BatchRows,
           adapters: dict[str, AdapterTensors]) -> torch.Tensor:
    """module(x) for every row, plus each adapter's delta on the rows of its sequences."""
    y = module(x)
    groups = [(rows, *adapters[a][path]) for a, rows in batch.adapter_rows.items() if path in adapters.get(a, {})]
    return kernels.lora_delta(y, x, groups) if groups else y


def run_embedding(block: EmbeddingBlock, token_ids: torch.Tensor, tp: Optional["TensorParallel"] = None
                  ) -> torch.Tensor:
    """Hidden states of `token_ids`. Under tensor parallelism `block` holds this rank's vocabulary rows: it
    looks up the tokens there (zeros for the others), and an all-reduce completes every row."""
    if tp is None:
        return block.embed_tokens(token_ids)
    weight = block.embed_tokens.weight
    if weight.shape[0] == 0:  # a vocabulary smaller than the degree leaves this rank no rows
        return tp.all_reduce(weight.new_zeros(*token_ids.shape, weight.shape[1]))
    local = token_ids - block.vocab_start
    outside = (local < 0) | (local >= weight.shape[0])
    hidden = torch.nn.functional.embedding(local.masked_fill(outside, 0), weight)
    return tp.all_reduce(hidden.masked_fill_(outside.unsqueeze(-1), 0.0))


def run_head(block: HeadBlock, hidden: torch.Tensor, batch: RaggedBatch, tp: Optional["TensorParallel"] = None
             ) -> torch.Tensor:
    """Logits (sequences, vocab) of each sequence's last token (under tensor parallelism each rank computes
    its part of the vocabulary, and every rank gets them all)."""
    last = hidden[batch.last_rows()]
    logits = block.lm_head(block.norm(last))
    return tp.gather_columns(logits, block.vocab_size) if tp is not None else logits


def _decode_attention(attn, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                      segs: list[Segment], cache: KVCache) -> None:
    """Write the new K/V of every one-token segment and attend for all of them in one call."""
    rows = torch.tensor([s.start for s in segs])
    positions = torch.tensor([s.position for s in segs])
    tables = cache.table_matrix([s.seq for s in segs], layer_idx)
    pages = tables[torch.arange(len(segs)), positions // cache.page_size]
    kernels.write_kv(cache.k, cache.v, k[rows], v[rows], pages * cache.page_size + positions % cache.page_size)
    out[rows] = kernels.decode_attention(q[rows], cache.k, cache.v, tables, positions + 1, attn.window, attn.scale)


def run_layer(layer: DecoderLayer, layer_idx: int, x: torch.Tensor, batch: RaggedBatch, cache: KVCache,
              adapters: dict[str, AdapterTensors], tp: Optional["TensorParallel"] = None) -> torch.Tensor:
    """x: (tokens, hidden) -> (tokens, hidden), writing this layer's K/V for every segment.

    The attention and the MLP are functions of their own so that each one's intermediates are freed
    when it returns: at a 512-token prefill chunk an MLP intermediate is 4 MiB, and the peak memory of
    the server is set by the intermediates alive at once. Under tensor parallelism (`tp`: this rank,
    `layer` its shard) each output projection gives a partial sum, completed by an all-reduce before
    the residual add."""
    o = _self_attention(layer.self_attn, layer_idx, layer.input_layernorm(x), batch, cache, adapters)
    if tp is not None:
        tp.all_reduce(o)
    norm = layer.post_attention_layernorm
    h, x = kernels.add_rms_norm(o, x, norm.weight, norm.eps)  # residual add fused with the norm after it
    del o
    m = _mlp(layer.mlp, h, batch, adapters)
    if tp is not None:
        tp.all_reduce(m)
    return x + m


def _self_attention(attn, layer_idx: int, h: torch.Tensor, batch: RaggedBatch, cache: KVCache,
                    adapters: dict[str, AdapterTensors]) -> torch.Tensor:
    """Normed hidden (tokens, hidden) -> attention output after o_proj (tokens, hidden)."""
    tokens = h.shape[0]
    q = linear(attn.q_proj, h, "self_attn.q_proj", batch, adapters).view(tokens, attn.num_heads, attn.head_dim)
    k = linear(attn.k_proj, h, "self_attn.k_proj", batch, adapters).view(tokens, attn.num_kv_heads, attn.head_dim)
    v = linear(attn.v_proj, h, "self_attn.v_proj", batch, adapters).view(tokens, attn.num_kv_heads, attn.head_dim)
    cos, sin = kernels.rope_cos_sin(batch.positions, attn.inv_freq, attn.rope_scaling, h.dtype)
    # apply_rotary takes (batch, heads, seq, head_dim); the ragged tokens are the seq axis of one batch.
    q, k = kernels.apply_rotary(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    q, k = q[0].transpose(0, 1), k[0].transpose(0, 1)
    out = torch.empty_like(q)
    decodes = [seg for seg in batch.segments if seg.length == 1]
    if len(decodes) > 1:
        _decode_attention(attn, layer_idx, q, k, v, out, decodes, cache)
    for seg in batch.segments:
        if len(decodes) > 1 and seg.length == 1:
            continue
        rows = slice(seg.start, seg.start + seg.length)
        cache.write(seg.seq, layer_idx, seg.position, k[rows], v[rows])
        keys, values = cache.read(seg.seq, layer_idx, seg.position + seg.length)
        out[rows] = kernels.paged_attention(q[rows], keys, values, batch.positions[rows], attn.window, attn.scale)
    del q, k, v
    return linear(attn.o_proj, out.reshape(tokens, attn.num_heads * attn.head_dim), "self_attn.o_proj", batch, adapters)


def _mlp(mlp, h: torch.Tensor, batch: RaggedBatch, adapters: dict[str, AdapterTensors]) -> torch.Tensor:
    """SwiGLU MLP on normed hidden (tokens, hidden), MLP_CHUNK_ROWS rows at a time on a CPU."""
    tokens = h.shape[0]
    if tokens <= MLP_CHUNK_ROWS or h.device.type != "cpu":
        return _mlp_rows(mlp, h, batch, adapters)
    out = torch.empty_like(h)
    for start in range(0, tokens, MLP_CHUNK_ROWS):
        end = min(start + MLP_CHUNK_ROWS, tokens)
        out[start:end] = _mlp_rows(mlp, h[start:end], batch.rows(start, end), adapters)
    return out


def _mlp_rows(mlp, h: torch.Tensor, batch: RaggedBatch | BatchRows, adapters: dict[str, AdapterTensors]) -> torch.Tensor:
    gate = linear(mlp.gate_proj, h, "mlp.gate_proj", batch, adapters)
    up = linear(mlp.up_proj, h, "mlp.up_proj", batch, adapters)
    act = kernels.silu_mul(gate, up)
    del gate, up  # freed before down_proj allocates its output
    return linear(mlp.down_proj, act, "mlp.down_proj", batch, adapters)
