"""Build block modules from stored tensors and run a variant's chain.

Blocks are loaded once per bundle (``Bundle.block_module``) and shared by every chain that uses them; a
LoRA variant's chain wraps the shared block in a view carrying its unmerged deltas (``with_lora``).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from planc.models.config import ArchConfig
from planc.models.llama import DecoderLayer, EmbeddingBlock, HeadBlock


def block_skeleton(kind: str, index: int, arch: ArchConfig) -> nn.Module:
    """A block module of `kind` with its parameters on the meta device (its buffers, config-derived, real)."""
    with torch.device("meta"):
        return {"embedding": lambda: EmbeddingBlock(arch), "layer": lambda: DecoderLayer(arch, index),
                "head": lambda: HeadBlock(arch)}[kind]()


def build_block(kind: str, index: int, arch: ArchConfig, tensors: dict[str, torch.Tensor],
                tied: Optional[dict[str, torch.Tensor]] = None) -> nn.Module:
    """A block module of `kind` with exactly `tensors` (+ `tied` tensors shared with other blocks)."""
    module = block_skeleton(kind, index, arch)
    state = dict(tensors)
    state.update(tied or {})
    missing, unexpected = module.load_state_dict(state, strict=False, assign=True)
    assert not missing and not unexpected, (kind, index, missing, unexpected)
    # inv_freq is a real CPU buffer even under the meta context (config-derived).
    return module.eval().requires_grad_(False)


class ChainModel(nn.Module):
    """A variant as its chain of blocks: token ids (batch, seq) -> logits (batch, seq, vocab)."""

    def __init__(self, blocks: list[nn.Module]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = input_ids
        for block in self.blocks:
            h = block(h)
        return h
