"""Random inputs of each op at a given serving shape, laid out as the runtime lays them out.

Shared by the tuning pass, the benchmark and the tests, so all three exercise the layouts the
engine produces (transposed rotary views, a shuffled page pool, adapter rows interleaved).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from planc.kernels import reference


def _randn(*shape: int, dtype: torch.dtype, device, gen: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    device = torch.device(device)
    if device.type == "cpu":
        return (torch.randn(*shape, generator=gen) * scale).to(dtype)
    # Benchmark pools run to gigabytes: draw them on the device, seeded from the CPU generator.
    dev_gen = torch.Generator(device).manual_seed(int(torch.randint(0, 2**62, (1,), generator=gen)))
    return (torch.randn(*shape, generator=dev_gen, device=device) * scale).to(dtype)


def rms_norm(rows: int, hidden: int, dtype, device, gen) -> tuple:
    return (_randn(rows, hidden, dtype=dtype, device=device, gen=gen),
            _randn(hidden, dtype=dtype, device=device, gen=gen), 1e-5)


def add_rms_norm(rows: int, hidden: int, dtype, device, gen) -> tuple:
    x, w, eps = rms_norm(rows, hidden, dtype, device, gen)
    return x, _randn(rows, hidden, dtype=dtype, device=device, gen=gen), w, eps


def silu_mul(rows: int, dim: int, dtype, device, gen) -> tuple:
    return tuple(_randn(rows, dim, dtype=dtype, device=device, gen=gen) for _ in range(2))


def apply_rotary(tokens: int, heads: int, kv_heads: int, head_dim: int, dtype, device, gen) -> tuple:
    """The executor's layout: (tokens, heads, dim) activations viewed as (1, heads, tokens, dim)."""
    q = _randn(tokens, heads, head_dim, dtype=dtype, device=device, gen=gen).transpose(0, 1)[None]
    k = _randn(tokens, kv_heads, head_dim, dtype=dtype, device=device, gen=gen).transpose(0, 1)[None]
    positions = torch.randint(0, 4096, (tokens,), generator=gen)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    cos, sin = reference.rope_cos_sin(positions, inv_freq, 1.0, dtype)
    return q, k, cos.to(device), sin.to(device)


def page_pool(num_pages: int, page_size: int, kv_heads: int, head_dim: int, dtype, device, gen) -> tuple:
    return (_randn(num_pages, page_size, kv_heads, head_dim, dtype=dtype, device=device, gen=gen),
            _randn(num_pages, page_size, kv_heads, head_dim, dtype=dtype, device=device, gen=gen))


def write_kv(tokens: int, kv_heads: int, head_dim: int, page_size: int, dtype, device, gen) -> tuple:
    num_pages = math.ceil(tokens / page_size) * 2
    k_pages, v_pages = page_pool(num_pages, page_size, kv_heads, head_dim, dtype, device, gen)
    slots = torch.randperm(num_pages * page_size, generator=gen)[:tokens].to(device)
    k = _randn(tokens, kv_heads, head_dim, dtype=dtype, device=device, gen=gen)
    v = _randn(tokens, kv_heads, head_dim, dtype=dtype, device=device, gen=gen)
    return k_pages, v_pages, k, v, slots


def decode_attention(context_lens: Sequence[int], heads: int, kv_heads: int, head_dim: int, page_size: int,
                     dtype, device, gen, window: Optional[int] = None, spare_pages: int = 3) -> tuple:
    """Sequences of the given context lengths whose pages are scattered through a shared pool."""
    need = [math.ceil(n / page_size) for n in context_lens]
    num_pages = sum(need) + spare_pages
    order = torch.randperm(num_pages, generator=gen)
    width = max(need)
    tables = torch.zeros(len(need), width, dtype=torch.int64)
    used = 0
    for i, n in enumerate(need):
        tables[i, :n] = order[used:used + n]
        used += n
    k_pages, v_pages = page_pool(num_pages, page_size, kv_heads, head_dim, dtype, device, gen)
    q = _randn(len(need), heads, head_dim, dtype=dtype, device=device, gen=gen)
    lens = torch.tensor(list(context_lens), dtype=torch.int64, device=device)
    return q, k_pages, v_pages, tables.to(device), lens, window, head_dim ** -0.5


def lora_delta(rows_per_adapter: Sequence[int], ranks: Sequence[int], in_dim: int, out_dim: int, dtype, device,
               gen) -> tuple:
    """Adapters' rows interleaved across the batch (as sequences of many tenants arrive)."""
    total = sum(rows_per_adapter)
    owner = torch.cat([torch.full((n,), i) for i, n in enumerate(rows_per_adapter)])
    owner = owner[torch.randperm(total, generator=gen)]
    x = _randn(total, in_dim, dtype=dtype, device=device, gen=gen)
    y = _randn(total, out_dim, dtype=dtype, device=device, gen=gen)
    groups = []
    for i, rank in enumerate(ranks):
        rows = (owner == i).nonzero().flatten().to(device)
        a = _randn(rank, in_dim, dtype=dtype, device=device, gen=gen, scale=in_dim ** -0.5)
        b = _randn(out_dim, rank, dtype=dtype, device=device, gen=gen, scale=rank ** -0.5)
        groups.append((rows, a, b, 16.0 / rank))
    return y, x, groups
