"""Paged KV cache: one pool of fixed-size pages, a page table per (sequence, layer position).

Every decoder-layer block instance of a bundle has the same KV shape (one architecture), so one
pool serves them all and capacity is shared; each sequence holds pages for each layer of its own
chain. Reservation is all-or-nothing per sequence, so a step never half-allocates.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from planc import kernels


class KVCache:
    def __init__(self, num_pages: int, page_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype):
        assert num_pages > 0 and page_size > 0
        self.page_size = page_size
        # (pages, page_size, kv_heads, head_dim)
        self.k = torch.zeros(num_pages, page_size, num_kv_heads, head_dim, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self._free = list(range(num_pages - 1, -1, -1))
        self._tables: dict[tuple[int, int], list[int]] = {}

    @classmethod
    def for_budget(cls, budget_bytes: int, page_size: int, num_kv_heads: int, head_dim: int,
                   dtype: torch.dtype) -> "KVCache":
        page_bytes = 2 * page_size * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()
        return cls(max(1, budget_bytes // page_bytes), page_size, num_kv_heads, head_dim, dtype)

    @property
    def num_pages(self) -> int:
        return self.k.shape[0]

    @property
    def num_free(self) -> int:
        return len(self._free)

    def usage(self) -> float:
        return 1.0 - self.num_free / self.num_pages

    def pages_for(self, num_tokens: int) -> int:
        return math.ceil(num_tokens / self.page_size)

    def extra_pages(self, seq: int, layers: Sequence[int], num_tokens: int) -> int:
        """Pages that must be added for `seq` to hold `num_tokens` tokens in each of `layers`."""
        need = self.pages_for(num_tokens)
        return sum(max(0, need - len(self._tables.get((seq, layer), ()))) for layer in layers)

    def reserve(self, seq: int, layers: Sequence[int], num_tokens: int) -> bool:
        """Grow `seq`'s page tables to `num_tokens` tokens in every one of `layers`, or change nothing."""
        if self.extra_pages(seq, layers, num_tokens) > self.num_free:
            return False
        need = self.pages_for(num_tokens)
        for layer in layers:
            table = self._tables.setdefault((seq, layer), [])
            while len(table) < need:
                table.append(self._free.pop())
        return True

    def free(self, seq: int) -> None:
        for key in [k for k in self._tables if k[0] == seq]:
            self._free.extend(reversed(self._tables.pop(key)))

    def _slots(self, seq: int, layer: int, start: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        table = torch.tensor(self._tables[(seq, layer)])
        pos = torch.arange(start, start + count)
        return table[pos // self.page_size], pos % self.page_size

    def write(self, seq: int, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v (tokens, kv_heads, head_dim) at positions start.. of (seq, layer)."""
        pages, offsets = self._slots(seq, layer, start, k.shape[0])
        kernels.write_kv(self.k, self.v, k, v, pages * self.page_size + offsets)

    def table_matrix(self, seqs: Sequence[int], layer: int) -> torch.Tensor:
        """Page tables of `seqs` in `layer` as one (len(seqs), max_pages) tensor, padded with page 0."""
        tables = [self._tables[(s, layer)] for s in seqs]
        width = max(len(t) for t in tables)
        return torch.tensor([t + [0] * (width - len(t)) for t in tables])

    def read(self, seq: int, layer: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first `length` keys and values of (seq, layer): (length, kv_heads, head_dim) each."""
        pages, offsets = self._slots(seq, layer, 0, length)
        return self.k[pages, offsets], self.v[pages, offsets]
