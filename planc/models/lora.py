"""PEFT LoRA adapters: read adapter_config.json + adapter_model.safetensors, and apply them.

A LoRA delta on a Linear ``W`` is ``scaling * B @ A`` with A: (rank, in), B: (out, rank) and
``scaling = alpha / rank`` (``alpha / sqrt(rank)`` with rsLoRA), per module after PEFT's
``rank_pattern``/``alpha_pattern``. planc keeps deltas unmerged: the base weights stay shared.
"""
from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from planc.errors import CheckpointError
from planc.jsonfile import read_json_object
from planc.models.safetensors_index import TensorRef, read_header

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[A-Za-z0-9_-]+)?\.weight$")


@dataclass(frozen=True)
class LoraModule:
    """One adapted Linear: `module` is the HF module name (model.layers.0.self_attn.q_proj)."""

    module: str
    a: TensorRef
    b: TensorRef
    rank: int
    scaling: float


@dataclass
class Adapter:
    directory: Path
    raw_config: dict[str, Any]
    modules: dict[str, LoraModule]
    files: list[Path]

    @classmethod
    def open(cls, directory: Path, field: str, base_shapes: dict[str, tuple[int, ...]]) -> "Adapter":
        """Read and validate against the base's Linear weight shapes (module name -> (out, in))."""
        try:
            return cls._open(directory, base_shapes)
        except CheckpointError as exc:
            raise CheckpointError(f"{field}: {exc}") from None

    @classmethod
    def _open(cls, directory: Path, base_shapes: dict[str, tuple[int, ...]]) -> "Adapter":
        if not directory.is_dir():
            raise CheckpointError(f"{directory} is not a directory")
        cfg_path = directory / "adapter_config.json"
        cfg = read_json_object(cfg_path, missing=f"{directory}: no adapter_config.json "
                                                 "(is this a PEFT adapter directory?)")
        _refuse_unsupported(cfg, cfg_path)
        weights = directory / "adapter_model.safetensors"
        if not weights.is_file():
            if (directory / "adapter_model.bin").is_file():
                raise CheckpointError(f"{directory}: adapter_model.bin is a pickle; planc reads adapter_model.safetensors")
            raise CheckpointError(f"{directory}: no adapter_model.safetensors")
        pairs: dict[str, dict[str, TensorRef]] = {}
        for key, ref in read_header(weights).items():
            m = _KEY.match(key)
            if m is None:
                raise CheckpointError(f"{weights}: tensor {key!r} is not a LoRA A/B weight "
                                      "(embedding LoRA, modules_to_save and biases are not supported)")
            pairs.setdefault(m["module"], {})[m["ab"]] = ref
        if not pairs:
            raise CheckpointError(f"{weights}: holds no LoRA weights")
        modules = {}
        for module, ab in sorted(pairs.items()):
            modules[module] = _check_module(cfg, cfg_path, weights, module, ab, base_shapes)
        return cls(directory, cfg, modules, [cfg_path, weights])


def _refuse_unsupported(cfg: dict[str, Any], where: Path) -> None:
    if cfg.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{where}: peft_type {cfg.get('peft_type')!r} is not supported (only LORA)")
    if cfg.get("use_dora"):
        raise CheckpointError(f"{where}: use_dora is not supported")
    if cfg.get("bias", "none") != "none":
        raise CheckpointError(f"{where}: bias {cfg.get('bias')!r} is not supported (only 'none')")
    if cfg.get("modules_to_save"):
        raise CheckpointError(f"{where}: modules_to_save {cfg['modules_to_save']} is not supported")
    if cfg.get("fan_in_fan_out"):
        raise CheckpointError(f"{where}: fan_in_fan_out is not supported for Llama-family Linear layers")
    for key in ("r", "lora_alpha"):
        _check_positive(cfg.get(key), f"`{key}`", where)
    for key in ("rank_pattern", "alpha_pattern"):
        patterns = cfg.get(key) or {}
        if not isinstance(patterns, dict):
            raise CheckpointError(f"{where}: `{key}` must be a mapping of module pattern to number")
        for pattern, value in patterns.items():
            _check_positive(value, f"`{key}.{pattern}`", where)


def _check_positive(value: Any, what: str, where: Path) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
        raise CheckpointError(f"{where}: {what} must be a positive number, got {value!r}")


def _pattern_value(patterns: Optional[dict[str, Any]], module: str, default: Any) -> Any:
    # PEFT matches a pattern key against the end of the module name.
    for key, value in (patterns or {}).items():
        try:
            if re.match(rf"(.*\.)?({key})$", module):
                return value
        except re.error as exc:
            raise CheckpointError(f"pattern {key!r} is not a valid regular expression: {exc}") from None
    return default


def _check_module(cfg: dict[str, Any], cfg_path: Path, weights: Path, module: str,
                  ab: dict[str, TensorRef], base_shapes: dict[str, tuple[int, ...]]) -> LoraModule:
    if set(ab) != {"A", "B"}:
        raise CheckpointError(f"{weights}: module {module} has lora_{''.join(ab)} without its pair")
    if module not in base_shapes:
        raise CheckpointError(f"{weights}: adapts {module}, which the base model does not have "
                              f"(adaptable: {', '.join(LORA_TARGETS)} of each layer)")
    out_dim, in_dim = base_shapes[module]
    a, b = ab["A"], ab["B"]
    try:
        rank = int(_pattern_value(cfg.get("rank_pattern"), module, cfg["r"]))
    except CheckpointError as exc:
        raise CheckpointError(f"{cfg_path}: rank_pattern: {exc}") from None
    if a.shape != (rank, in_dim) or b.shape != (out_dim, rank):
        raise CheckpointError(f"{weights}: {module} lora_A {list(a.shape)} / lora_B {list(b.shape)} do not fit "
                              f"rank {rank} on a ({out_dim}, {in_dim}) weight")
    try:
        alpha = float(_pattern_value(cfg.get("alpha_pattern"), module, cfg["lora_alpha"]))
    except CheckpointError as exc:
        raise CheckpointError(f"{cfg_path}: alpha_pattern: {exc}") from None
    scaling = alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank
    return LoraModule(module, a, b, rank, scaling)


class LoRALinear(nn.Module):
    """A Linear plus its unmerged LoRA delta; the base Linear is shared, not copied."""

    def __init__(self, base: nn.Linear, a: torch.Tensor, b: torch.Tensor, scaling: float):
        super().__init__()
        self.base = base
        self.lora_a = nn.Parameter(a, requires_grad=False)  # (rank, in)
        self.lora_b = nn.Parameter(b, requires_grad=False)  # (out, rank)
        self.scaling = scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_a.t() @ self.lora_b.t()) * self.scaling


def with_lora(block: nn.Module, deltas: dict[str, tuple[torch.Tensor, torch.Tensor, float]]) -> nn.Module:
    """A view of `block` whose named Linears carry LoRA deltas; parameters are shared with `block`.

    `deltas` maps a module path inside the block (``self_attn.q_proj``) to (A, B, scaling).
    """
    shared = {id(t): t for t in list(block.parameters()) + list(block.buffers())}
    view = copy.deepcopy(block, memo=shared)
    for path, (a, b, scaling) in deltas.items():
        parent_path, _, leaf = path.rpartition(".")
        parent = view.get_submodule(parent_path) if parent_path else view
        base = getattr(parent, leaf)
        assert isinstance(base, nn.Linear), path
        setattr(parent, leaf, LoRALinear(base, a.to(base.weight.dtype), b.to(base.weight.dtype), scaling))
    return view
