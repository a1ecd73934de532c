"""The Program: one object every pass reads from and writes to.

>>> import planc
>>> program = planc.load("examples/tiny/model.yaml")    # doctest: +SKIP
>>> program.model_names()                               # doctest: +SKIP
['base', 'legal', 'support', 'chat']
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch.fx

from planc.errors import CheckpointError
from planc.ir import AdapterDelta, BlockFingerprint, BlockSpec, Chain, ZooBlock
from planc.models.checkpoint import Checkpoint
from planc.models.lora import Adapter
from planc.models.tokenizer import load_tokenizer, tokenizer_files
from planc.plan import BlockGroup, Plan
from planc.spec import Spec, VariantRef, field_of


@dataclass
class ModelEntry:
    """One model of the spec: the base, a full-weight variant, or a LoRA variant."""

    name: str
    kind: str
    """`base`, `weights` or `adapter`."""
    field: str
    """The model.yaml field that names its files, for error messages."""
    checkpoint: Checkpoint
    """Its own checkpoint; for an adapter variant, the base's."""
    adapter: Optional[Adapter] = None
    tokenizer: list[Path] = field(default_factory=list)
    """Tokenizer files it is served with (its own when it has tokenizer.json, else the base's)."""
    declared: Optional[VariantRef] = None
    """Plan-only: the spec entry whose `changes`/`lora` (or adapter_config.json) describe the variant
    when its weights are not read."""


@dataclass
class PassRecord:
    name: str
    seconds: float
    changed: bool


@dataclass
class Program:
    spec: Spec
    models: dict[str, ModelEntry]
    graphs: Optional[dict[str, torch.fx.GraphModule]] = None
    """trace: model name -> flat GraphModule (models with equal architectures share one)."""
    blocks: Optional[dict[str, list[BlockSpec]]] = None
    """partition: model name -> its blocks in chain order."""
    fingerprints: Optional[dict[str, list[BlockFingerprint]]] = None
    """fingerprint: model name -> identity of each of its blocks (weights from its own checkpoint)."""
    adapter_deltas: Optional[dict[str, dict[str, AdapterDelta]]] = None
    """fingerprint: LoRA variant -> block name -> its delta on that block."""
    input_digests: Optional[dict[str, str]] = None
    """fingerprint: model name -> sha256 over its config and every tensor it contributes."""
    zoo: Optional[dict[str, ZooBlock]] = None
    """dedupe: unique blocks by key, in first-use order."""
    adapter_zoo: Optional[dict[str, AdapterDelta]] = None
    """dedupe: unique adapter deltas by key."""
    chains: Optional[dict[str, Chain]] = None
    """dedupe: variant name -> chain."""
    groups: Optional[list[BlockGroup]] = None
    """cost: block groups (runs of chain positions with the same users and instances)."""
    plan_options: Optional[dict[str, list[Any]]] = None
    """cost: group id -> candidate layouts (passes.cost.GroupOption) on the plan's cluster."""
    plan: Optional[Plan] = None
    """parallelize: the chosen deployment."""
    extras: dict[str, Any] = field(default_factory=dict)
    """Artifacts of user passes, by the names in their `provides`."""
    log: list[PassRecord] = field(default_factory=list)

    def model_names(self) -> list[str]:
        return list(self.models)

    @property
    def base(self) -> ModelEntry:
        return self.models[self.spec.base.name]

    def has(self, artifact: str) -> bool:
        if artifact in self.extras:
            return True
        return getattr(self, artifact, None) is not None if artifact in _FIELDS else False

    def get(self, artifact: str) -> Any:
        return self.extras[artifact] if artifact in self.extras else getattr(self, artifact)


_FIELDS = {"graphs", "blocks", "fingerprints", "adapter_deltas", "input_digests", "zoo", "adapter_zoo", "chains",
           "groups", "plan_options", "plan"}


def open_models(spec: Spec, weights: bool = True) -> dict[str, ModelEntry]:
    """Open every model of the spec: headers and configs only, no tensor bytes.

    With ``weights=False`` only config.json is read (plan-only, meta device).
    """
    opener = Checkpoint.open if weights else Checkpoint.from_config
    base_field = field_of(spec, spec.base.name)
    base = opener(spec.base.path, base_field)
    base_tok = tokenizer_files(spec.base.path, base_field) if weights else []
    models = {spec.base.name: ModelEntry(spec.base.name, "base", base_field, base, tokenizer=base_tok)}
    linear_shapes = {name.removesuffix(".weight"): tuple(ref.shape) for name, ref in base.tensors.items()
                     if name.endswith("proj.weight")}
    for variant in spec.variants:
        fld = field_of(spec, variant.name)
        if variant.declared_only or not weights:
            if weights:
                raise CheckpointError(f"{fld}: {variant.name} is only described (no `path` or `adapter`); "
                                      "it can be planned (planc plan) but not compiled")
            models[variant.name] = _plan_only_entry(variant, fld, base, opener)
            continue
        if variant.adapter is not None:
            adapter = Adapter.open(variant.adapter, fld, linear_shapes) if weights else None
            tok = _own_tokenizer(variant.adapter, fld) or base_tok
            models[variant.name] = ModelEntry(variant.name, "adapter", fld, base, adapter, tok)
            continue
        ckpt = opener(variant.path, fld)
        diff = base.arch.differences(ckpt.arch)
        if diff:
            raise CheckpointError(f"{fld}: {variant.path / 'config.json'} differs from the base ({spec.base.name}) "
                                  f"in {'; '.join(diff[:3])}")
        tok = _own_tokenizer(variant.path, fld) if weights else []
        models[variant.name] = ModelEntry(variant.name, "weights", fld, ckpt, tokenizer=tok or base_tok)
    if weights:
        for entry in models.values():
            _check_vocab(entry)
    return models


def _plan_only_entry(variant: VariantRef, fld: str, base: Checkpoint, opener) -> ModelEntry:
    """A variant opened for planning: its config.json when the files exist, else the base's."""
    if variant.is_adapter:
        return ModelEntry(variant.name, "adapter", fld, base, declared=variant)
    ckpt = base
    if variant.path is not None and (variant.path / "config.json").is_file():
        ckpt = opener(variant.path, fld)
    elif variant.changes is None:
        raise CheckpointError(f"{fld}: {variant.path / 'config.json'}: no such file (to plan without the "
                              "checkpoint, describe the fine-tune with `changes: [layers.28-31, head]`)")
    diff = base.arch.differences(ckpt.arch)
    if diff:
        raise CheckpointError(f"{fld}: {variant.path / 'config.json'} differs from the base in {'; '.join(diff[:3])}")
    return ModelEntry(variant.name, "weights", fld, ckpt, declared=variant)


def _check_vocab(entry: ModelEntry) -> None:
    """A tokenizer that can emit ids past the embedding would crash the server at the first such token."""
    tok_json = next((p for p in entry.tokenizer if p.name == "tokenizer.json"), None)
    if tok_json is None:
        return
    size = load_tokenizer(tok_json.parent).get_vocab_size(with_added_tokens=True)
    vocab = entry.checkpoint.arch.vocab_size
    if size > vocab:
        raise CheckpointError(f"{entry.field}: {tok_json} has {size} tokens but the model's vocab_size is {vocab}")


def _own_tokenizer(directory: Path, fld: str) -> list[Path]:
    return tokenizer_files(directory, fld) if (directory / "tokenizer.json").is_file() else []
