"""Tensor parallelism (Megatron-style) for a stage: one rank's shard of each block, and the collectives.

A stage copy of tensor-parallel degree t runs as t processes (ranks), each holding 1/t of every
decoder layer and of the head, and its KV heads' share of the KV cache:
- q/k/v and gate/up projections are split by output rows (rank r keeps attention heads
  r*H/t..(r+1)*H/t and its KV heads, and the same part of the MLP's intermediate);
- o_proj and down_proj are split by input columns: each rank's output is a partial sum, which one
  all-reduce per projection completes (two per layer), before the residual add;
- the head's lm_head is split by vocabulary rows; the logits are gathered from every rank;
- norms and the embedding are kept whole on every rank (an embedding lookup is cheap and each rank
  needs the whole hidden state).
A LoRA delta follows its projection: B split by rows on a column-split projection, A by columns on a
row-split one (its partial sum joins the base's in the all-reduce). A bias of a row-split projection
is added by rank 0 only. Every rank runs the same block calls on the same inputs and ends a layer
with the same hidden state, so the engine talks to rank 0 and sends the others the same calls.

The collectives run over `torch.distributed` (gloo on CPUs, NCCL on GPUs) in a process group of the
copy's ranks (`join`).

>>> tp = TensorParallel(rank=1, size=2)
>>> tp.rows(10), tp.rows(7)
(slice(5, 10, None), slice(4, 7, None))
"""
from __future__ import annotations

import copy
import math
from datetime import timedelta
from typing import Optional

import torch
from torch import nn

from planc.errors import PlancError
from planc.models.config import ArchConfig

COLUMN_SPLIT = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")
"""Projections split by output rows (their outputs stay split until the row-split projection after them)."""
ROW_SPLIT = ("self_attn.o_proj", "mlp.down_proj")
"""Projections split by input columns: their outputs are partial sums, completed by an all-reduce."""
GROUP_TIMEOUT_S = 60.0
"""How long a collective waits for a rank that does not come (a dead rank fails its copy's calls then)."""


class GroupBroken(RuntimeError):
    """A collective failed: a rank of the copy died or restarted, and the group must be formed again."""


class TensorParallel:
    """One rank of a tensor-parallel group of `size`: how to shard blocks, and the collectives (once `join`ed)."""

    def __init__(self, rank: int, size: int):
        if not 0 <= rank < size:
            raise ValueError(f"tensor-parallel rank {rank} of {size}")
        self.rank, self.size = rank, size
        self.group = None

    # ------------------------------------------------------------------ process group
    def join(self, address: str, port: int, backend: str = "gloo") -> None:
        """Join the group of this copy's ranks (every rank calls it; it returns when all have). Joining
        again (after a rank restarted) leaves the old group first."""
        import os

        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
        if backend == "gloo" and "GLOO_SOCKET_IFNAME" not in os.environ:
            # gloo connects over the interface of this host's name unless told: the rendezvous' is the one
            interface = interface_of(address)
            if interface:
                os.environ["GLOO_SOCKET_IFNAME"] = interface
        dist.init_process_group(backend, init_method=f"tcp://{address}:{port}", rank=self.rank,
                                world_size=self.size, timeout=timedelta(seconds=GROUP_TIMEOUT_S))
        self.group = dist.group.WORLD

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum over ranks of each rank's partial `x` (in place)."""
        import torch.distributed as dist

        try:
            dist.all_reduce(x, group=self.group)
        except RuntimeError as exc:  # torch.distributed's errors derive from it
            raise GroupBroken(f"tensor-parallel rank {self.rank} of {self.size}: all-reduce failed: {exc}") from None
        return x

    def gather_columns(self, x: torch.Tensor, total: int) -> torch.Tensor:
        """Every rank's `x` (rows, its columns `rows(total)`, padded to ceil(total/size)) side by side,
        trimmed to `total` columns."""
        import torch.distributed as dist

        parts = [torch.empty_like(x) for _ in range(self.size)]
        try:
            dist.all_gather(parts, x.contiguous(), group=self.group)
        except RuntimeError as exc:
            raise GroupBroken(f"tensor-parallel rank {self.rank} of {self.size}: all-gather failed: {exc}") from None
        return torch.cat(parts, dim=-1)[..., :total]

    # ------------------------------------------------------------------ shards
    def rows(self, total: int) -> slice:
        """This rank's part of `total` (ceil(total/size) each; the last part may be shorter)."""
        chunk = math.ceil(total / self.size)
        return slice(min(self.rank * chunk, total), min((self.rank + 1) * chunk, total))

    def check(self, arch: ArchConfig, where: str) -> None:
        """Refuse, in one line, an architecture this degree does not divide."""
        for name, value in (("num_attention_heads", arch.num_heads), ("num_key_value_heads", arch.num_kv_heads),
                            ("intermediate_size", arch.intermediate_size)):
            if value % self.size:
                raise PlancError(f"{where}: tensor parallelism {self.size} needs config.json's {name} ({value}) "
                                 f"to be a multiple of {self.size}")

    def shard_layer(self, layer: nn.Module) -> nn.Module:
        """This rank's part of a decoder layer (a new module; `layer` is left as it is)."""
        out = copy.copy(layer)  # shallow: submodules are replaced below, never modified
        out._modules = dict(layer._modules)
        attn = copy.copy(layer.self_attn)
        attn._modules = dict(attn._modules)
        heads, kv_heads, hd = attn.num_heads // self.size, attn.num_kv_heads // self.size, attn.head_dim
        attn.num_heads, attn.num_kv_heads = heads, kv_heads
        attn.q_proj = _split_rows(attn.q_proj, slice(self.rank * heads * hd, (self.rank + 1) * heads * hd))
        for name in ("k_proj", "v_proj"):
            setattr(attn, name, _split_rows(getattr(attn, name),
                                            slice(self.rank * kv_heads * hd, (self.rank + 1) * kv_heads * hd)))
        attn.o_proj = _split_columns(attn.o_proj, slice(self.rank * heads * hd, (self.rank + 1) * heads * hd),
                                     keep_bias=self.rank == 0)
        mlp = copy.copy(layer.mlp)
        mlp._modules = dict(mlp._modules)
        part = self.rows(mlp.gate_proj.out_features)
        mlp.gate_proj, mlp.up_proj = _split_rows(mlp.gate_proj, part), _split_rows(mlp.up_proj, part)
        mlp.down_proj = _split_columns(mlp.down_proj, part, keep_bias=self.rank == 0)
        out.self_attn, out.mlp = attn, mlp
        return out

    def shard_head(self, head: nn.Module) -> nn.Module:
        """This rank's vocabulary rows of the head (padded with zero rows to ceil(vocab/size), so that
        every rank's logits have one width for the gather); the norm is kept whole."""
        out = copy.copy(head)
        out._modules = dict(head._modules)
        vocab = head.lm_head.out_features
        part = self.rows(vocab)
        weight = head.lm_head.weight.detach()[part]
        pad = math.ceil(vocab / self.size) - weight.shape[0]
        if pad:
            weight = torch.cat([weight, weight.new_zeros(pad, weight.shape[1])])
        out.lm_head = _linear(weight.clone(), None)
        out.vocab_size = vocab
        return out

    def shard_adapter(self, deltas: dict[str, tuple[torch.Tensor, torch.Tensor, float]], layer: nn.Module
                      ) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
        """This rank's part of one block's LoRA deltas (path -> (A (r, in), B (out, r), scaling)), split as
        the projections of `layer` (the whole layer, before `shard_layer`) are."""
        attn = layer.self_attn
        hd = attn.head_dim
        q_part = slice(self.rank * attn.num_heads // self.size * hd, (self.rank + 1) * attn.num_heads // self.size * hd)
        kv_part = slice(self.rank * attn.num_kv_heads // self.size * hd,
                        (self.rank + 1) * attn.num_kv_heads // self.size * hd)
        mlp_part = self.rows(layer.mlp.gate_proj.out_features)
        out_rows = {"self_attn.q_proj": q_part, "self_attn.k_proj": kv_part, "self_attn.v_proj": kv_part,
                    "mlp.gate_proj": mlp_part, "mlp.up_proj": mlp_part}
        in_columns = {"self_attn.o_proj": q_part, "mlp.down_proj": mlp_part}
        out = {}
        for path, (a, b, scaling) in deltas.items():
            if path in out_rows:
                out[path] = (a, b[out_rows[path]].contiguous(), scaling)
            elif path in in_columns:
                out[path] = (a[:, in_columns[path]].contiguous(), b, scaling)
            else:
                raise PlancError(f"tensor parallelism: a LoRA delta on {path} is not supported "
                                 f"(only {', '.join(COLUMN_SPLIT + ROW_SPLIT)})")
        return out


def _linear(weight: torch.Tensor, bias: Optional[torch.Tensor]) -> nn.Linear:
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    out.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        out.bias = nn.Parameter(bias, requires_grad=False)
    return out


def _split_rows(linear: nn.Linear, part: slice) -> nn.Linear:
    bias = linear.bias.detach()[part].clone() if linear.bias is not None else None
    return _linear(linear.weight.detach()[part].clone(), bias)


def _split_columns(linear: nn.Linear, part: slice, keep_bias: bool) -> nn.Linear:
    bias = linear.bias.detach().clone() if linear.bias is not None and keep_bias else None
    return _linear(linear.weight.detach()[:, part].clone(), bias)


def interface_of(address: str) -> Optional[str]:
    """The name of this host's network interface that has `address` (None if none has, or psutil is absent)."""
    try:
        import psutil
    except ImportError:
        return None
    for name, addresses in psutil.net_if_addrs().items():
        if any(a.address == address for a in addresses):
            return name
    return None


def free_port(address: str = "127.0.0.1") -> int:
    """A TCP port free on `address` now (for a group's rendezvous)."""
    import socket

    with socket.socket() as s:
        s.bind((address, 0))
        return s.getsockname()[1]
