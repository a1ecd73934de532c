"""The IR that passes read and annotate: blocks, fingerprints, the block zoo and chains.

FX annotations live under the keys below and nowhere else.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Optional

import torch.fx

from planc.models.safetensors_index import TensorRef

# node.meta keys written by planc's passes (one place, namespaced).
META_BLOCK = "planc.block"
"""partition: the name of the block a node belongs to ("embedding", "layer.3", "head")."""
META_BOUNDARY = "planc.boundary"
"""partition: "in" on the first node of a block that reads its input, "out" on the node whose value leaves it."""
GRAPH_META_ARCH = "planc.arch"
"""trace: GraphModule.meta key holding the ArchConfig the graph was traced from."""

BLOCK_KINDS = ("embedding", "layer", "head")


@dataclass
class BlockSpec:
    """One block of a traced architecture (partition). Shared by every model with that architecture."""

    name: str
    kind: str
    index: int
    graph: torch.fx.GraphModule
    """The block alone: one tensor in, one tensor out (from torch.fx split_module)."""
    params: dict[str, str]
    """Name inside the block module (``self_attn.q_proj.weight``) -> checkpoint name."""
    ties: dict[str, tuple[str, str]] = field(default_factory=dict)
    """Name inside this block -> (other block, name there) for tensors shared with an earlier block."""


@dataclass(frozen=True)
class BlockFingerprint:
    """Identity of one model's block (fingerprint): equal fingerprints compute the same function."""

    block: str
    structure_hash: str
    weight_hash: str
    nbytes: int
    num_params: int
    tensors: tuple[tuple[str, str, int], ...] = ()
    """(name inside the block, content id, bytes) per stored tensor; equal ids are equal tensors."""

    @property
    def key(self) -> str:
        return hashlib.sha256(f"{self.structure_hash}:{self.weight_hash}".encode()).hexdigest()


@dataclass(frozen=True)
class LoraDelta:
    """One adapted Linear inside a block: ``module`` is relative to the block (``self_attn.q_proj``)."""

    module: str
    a: TensorRef
    b: TensorRef
    rank: int
    scaling: float


@dataclass(frozen=True)
class AdapterDelta:
    """A LoRA variant's deltas on one block (fingerprint); content-addressed by `key`."""

    block: str
    key: str
    modules: tuple[LoraDelta, ...]
    nbytes: int


@dataclass
class ZooBlock:
    """A unique block (dedupe): stored once, loaded once, used by every model in `users`."""

    key: str
    name: str
    kind: str
    index: int
    structure_hash: str
    weight_hash: str
    nbytes: int
    num_params: int
    source: str
    """The first model holding it; its checkpoint is where the bytes are read from."""
    users: list[str] = field(default_factory=list)
    tensors: tuple[tuple[str, str, int], ...] = ()
    """(name inside the block, content id, bytes): tensors equal across blocks are stored once."""


@dataclass(frozen=True)
class ChainLink:
    block: str
    """ZooBlock key."""
    adapter: Optional[str] = None
    """AdapterDelta key, for LoRA variants on blocks the adapter touches."""


@dataclass
class Chain:
    """What one variant runs: its blocks in order, each with an optional adapter delta (dedupe)."""

    variant: str
    kind: str
    """`base`; `identical` (every block equal to the base's), `partial` (some), `full` (none); or `lora`."""
    links: list[ChainLink]

    @property
    def block_keys(self) -> list[str]:
        return [link.block for link in self.links]
