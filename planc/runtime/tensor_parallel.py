"""Tensor parallelism (Megatron-style) for a stage: one rank's shard of each block, and the collectives.

A stage copy of tensor-parallel degree t runs as t processes (ranks), each holding 1/t of every
decoder layer and of the head, and its KV heads' share of the KV cache:
- q/k/v and gate/up projections are split by output rows (rank r keeps attention heads
  r*H/t..(r+1)*H/t and its KV heads, and the same part of the MLP's intermediate);
- o_proj and down_proj are split by input columns: each rank's output is a partial sum, which one
  all-reduce per projection completes (two per layer), before the residual add;
- the head's lm_head is split by vocabulary rows; the logits are gathered from every rank;
- the embedding is split by vocabulary rows too: each rank looks up the tokens in its rows (zeros for
  the others) and one all-reduce completes the hidden states;
- norms are kept whole on every rank.
A LoRA delta follows its projection: B split by rows on a column-split projection, A by columns on a
row-split one (its partial sum joins the base's in the all-reduce). A bias of a row-split projection
is added by rank 0 only. Every rank runs the same block calls on the same inputs and ends a layer
with the same hidden state, so the engine talks to rank 0 and sends the others the same calls.

The collectives run over `torch.distributed` in a process group of the copy's ranks (`join`); the
runtime runs on CPUs, so the group is gloo's.

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
from planc.net import tcp_url

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
        dist.init_process_group(backend, init_method=tcp_url(address, port), rank=self.rank,
                                world_size=self.size, timeout=timedelta(seconds=GROUP_TIMEOUT_S))
        self.group = dist.group.WORLD

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum over ranks of each rank's partial `x` (in place)."""
        import torch.distributed as dist

        try:
            dist.all_reduce(x, group=self.group)
        except (RuntimeError, ValueError) as exc:  # torch.distributed's errors; ValueError: no group joined
            raise GroupBroken(f"tensor-parallel rank {self.rank} of {self.size}: all-reduce failed: {exc}") from None
        return x

    def gather_columns(self, x: torch.Tensor, total: int) -> torch.Tensor:
        """Every rank's `x` (rows, its columns `rows(total)`, padded to ceil(total/size)) side by side,
        trimmed to `total` columns."""
        import torch.distributed as dist

        parts = [torch.empty_like(x) for _ in range(self.size)]
        try:
            dist.all_gather(parts, x.contiguous(), group=self.group)
        except (RuntimeError, ValueError) as exc:
            raise GroupBroken(f"tensor-parallel rank {self.rank} of {self.size}: all-gather failed: {exc}") from None
        return torch.cat(parts, dim=-1)[..., :total]

    # ------------------------------------------------------------------ shards
    def rows(self, total: int) -> slice:
        """This rank's part of `total` (ceil(total/size) each; the last part may be shorter)."""
        chunk = math.ceil(total / self.size)
        return slice(min(self.rank * chunk, total), min((self.rank + 1) * chunk, total))

    def check(self, arch: ArchConfig, where: str) -> None:
        """Refuse, in one line, an architecture this degree does not divide (`ArchConfig.tensor_parallel_misfit`)."""
        why = arch.tensor_parallel_misfit(self.size)
        if why:
            raise PlancError(f"{where}: tensor parallelism {self.size}: {why}")

    def projection_parts(self, arch: ArchConfig) -> dict[str, tuple[int, slice]]:
        """Per projection of a decoder layer (`self_attn.q_proj`, ...), the dimension of its weight this rank
        splits (0: output rows, 1: input columns) and its part: its attention heads, its KV heads, its
        share of the MLP's intermediate."""
        hd, heads, kv_heads = arch.head_dim, arch.num_heads // self.size, arch.num_kv_heads // self.size
        q = slice(self.rank * heads * hd, (self.rank + 1) * heads * hd)
        kv = slice(self.rank * kv_heads * hd, (self.rank + 1) * kv_heads * hd)
        mlp = self.rows(arch.intermediate_size)
        return {"self_attn.q_proj": (0, q), "self_attn.k_proj": (0, kv), "self_attn.v_proj": (0, kv),
                "self_attn.o_proj": (1, q), "mlp.gate_proj": (0, mlp), "mlp.up_proj": (0, mlp),
                "mlp.down_proj": (1, mlp)}

    def tensor_parts(self, kind: str, names: list[str], arch: ArchConfig) -> dict[str, Optional[tuple[int, slice]]]:
        """Per tensor of a block of `kind` (its names in the block, e.g. `self_attn.q_proj.weight`), what
        this rank keeps: (dim, part), or None for the whole tensor; a tensor it drops is left out (the bias
        of a row-split projection, on ranks other than 0)."""
        vocab = self.rows(arch.vocab_size)
        projections = {"layer": lambda: self.projection_parts(arch), "head": lambda: {"lm_head": (0, vocab)},
                       "embedding": lambda: {"embed_tokens": (0, vocab)}}[kind]()
        out: dict[str, Optional[tuple[int, slice]]] = {}
        for name in names:
            module, leaf = name.rsplit(".", 1)
            if module not in projections:
                out[name] = None  # norms
            elif leaf == "weight" or projections[module][0] == 0:
                out[name] = projections[module]  # a column-split projection's bias goes with its rows
            elif self.rank == 0:
                out[name] = None  # a row-split projection's bias: added once, to the completed sum
        return out

    def shard(self, kind: str, skeleton: nn.Module, read, arch: ArchConfig) -> nn.Module:
        """This rank's part of a block: a copy of `skeleton`'s structure (the block, whole or on
        the meta device; it is left as it is) whose tensors are `read(name, part)` (`tensor_parts`). The
        head's rows are padded with zeros to ceil(vocab/size), so that every rank's logits have one width."""
        out = _structure(skeleton)
        names = [n for n, _ in skeleton.named_parameters()]
        parts = self.tensor_parts(kind, names, arch)
        for name in names:
            module_path, leaf = name.rsplit(".", 1)
            module = out.get_submodule(module_path)
            if name not in parts:
                setattr(module, leaf, None)
                continue
            tensor = read(name, parts[name])
            if kind == "head" and module_path == "lm_head":
                pad = math.ceil(arch.vocab_size / self.size) - tensor.shape[0]
                tensor = torch.cat([tensor, tensor.new_zeros(pad, tensor.shape[1])]) if pad else tensor
            setattr(module, leaf, nn.Parameter(tensor, requires_grad=False))
        if kind == "layer":
            out.self_attn.num_heads = arch.num_heads // self.size
            out.self_attn.num_kv_heads = arch.num_kv_heads // self.size
        else:
            out.vocab_size, out.vocab_start = arch.vocab_size, self.rows(arch.vocab_size).start
        return out

    def shard_module(self, kind: str, block: nn.Module, arch: ArchConfig) -> nn.Module:
        """`shard` of a block held in memory (copies of its tensors' parts: the block can then be freed)."""
        tensors = dict(block.named_parameters())

        def read(name: str, part: Optional[tuple[int, slice]]) -> torch.Tensor:
            t = tensors[name].detach()
            if part is None:
                return t
            dim, sl = part
            return t.narrow(dim, sl.start, sl.stop - sl.start).clone()

        return self.shard(kind, block, read, arch)

    def shard_adapter(self, deltas: dict[str, tuple[torch.Tensor, torch.Tensor, float]], arch: ArchConfig
                      ) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
        """This rank's part of one block's LoRA deltas (path -> (A (r, in), B (out, r), scaling)), split as
        their projections are: B by rows on a column-split projection, A by columns on a row-split one."""
        parts = self.projection_parts(arch)
        out = {}
        for path, (a, b, scaling) in deltas.items():
            if path not in parts:
                raise PlancError(f"tensor parallelism: a LoRA delta on {path} is not supported "
                                 f"(only {', '.join(COLUMN_SPLIT + ROW_SPLIT)})")
            dim, part = parts[path]
            out[path] = (a, b[part].contiguous(), scaling) if dim == 0 else (a[:, part].contiguous(), b, scaling)
        return out


def _structure(block: nn.Module) -> nn.Module:
    """A copy of `block` that shares no tensor with it: its parameters on the meta device, to be replaced."""
    memo = {id(p): nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"), requires_grad=False)
            for p in block.parameters()}
    return copy.deepcopy(block, memo)


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


