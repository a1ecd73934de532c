"""An HF-format checkpoint directory opened lazily: config, tensor index, generation ids.

>>> ckpt = Checkpoint.open(Path("examples/tiny/models/base"), "base.path")  # doctest: +SKIP
>>> ckpt.arch.num_layers, len(ckpt.tensors)  # doctest: +SKIP
(4, 39)
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from planc.errors import CheckpointError
from planc.models.config import ArchConfig, GenerationIds, generation_ids, parse_arch, read_config_json
from planc.models.llama import expected_tensors
from planc.models.safetensors_index import TensorRef, read_checkpoint_tensors

# Tensors older writers saved that carry no information planc needs (derived from config).
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


@dataclass
class Checkpoint:
    directory: Path
    raw_config: dict[str, Any]
    arch: ArchConfig
    generation: GenerationIds
    tensors: dict[str, TensorRef]
    """Checkpoint tensor name -> where its bytes are; exactly the tensors the model uses."""
    files: list[Path]

    @classmethod
    def open(cls, directory: Path, field: str) -> "Checkpoint":
        """Open and validate; errors are prefixed with `field` (the model.yaml key naming it)."""
        if not directory.is_dir():
            raise CheckpointError(f"{field}: {directory} is not a directory")
        try:
            raw = read_config_json(directory / "config.json")
            arch = parse_arch(raw, str(directory / "config.json"))
            tensors, files = read_checkpoint_tensors(directory)
            tensors, arch = _resolve_tied_head(arch, tensors, directory)
            tensors = _check_tensors(arch, tensors, directory)
            gen = generation_ids(directory, raw)
        except CheckpointError as exc:
            raise CheckpointError(f"{field}: {exc}") from None
        return cls(directory, raw, arch, gen, tensors, files)

    @classmethod
    def from_config(cls, directory: Path, field: str) -> "Checkpoint":
        """Config only (no weights): enough to trace on the meta device and plan."""
        try:
            raw = read_config_json(directory / "config.json")
            arch = parse_arch(raw, str(directory / "config.json"))
        except CheckpointError as exc:
            raise CheckpointError(f"{field}: {exc}") from None
        return cls(directory, raw, arch, generation_ids(directory, raw), {}, [])

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


def _same_bytes(a: TensorRef, b: TensorRef) -> bool:
    if (a.dtype, a.shape) != (b.dtype, b.shape):
        return False
    return all(x == y for x, y in zip(a.chunks(), b.chunks()))


def _resolve_tied_head(arch: ArchConfig, tensors: dict[str, TensorRef],
                       directory: Path) -> tuple[dict[str, TensorRef], ArchConfig]:
    """What transformers does with a config that says `tie_word_embeddings`:
    - only the embedding stored: the head is the embedding (tied);
    - both stored and equal: a saved copy, ignored (tied);
    - both stored and different: the head was trained on its own, so the model is untied;
    - only lm_head stored: it is the embedding too."""
    if not arch.tie_word_embeddings or "lm_head.weight" not in tensors:
        return tensors, arch
    tensors = dict(tensors)
    head = tensors.pop("lm_head.weight")
    emb = tensors.get("model.embed_tokens.weight")
    if emb is None:
        tensors["model.embed_tokens.weight"] = head
        return tensors, arch
    if _same_bytes(emb, head):
        return tensors, arch
    tensors["lm_head.weight"] = head
    return tensors, dataclasses.replace(arch, tie_word_embeddings=False)


def _check_tensors(arch: ArchConfig, tensors: dict[str, TensorRef], directory: Path) -> dict[str, TensorRef]:
    expected = expected_tensors(arch)
    out = {}
    for name, ref in tensors.items():
        if name.endswith(_IGNORED_SUFFIXES):
            continue
        if name not in expected:
            raise CheckpointError(f"{directory}: unexpected tensor {name!r} for a {arch.family} model "
                                  "(an architecture feature planc does not implement?)")
        shape, _ = expected[name]
        if tuple(ref.shape) != tuple(shape):
            raise CheckpointError(f"{directory}: tensor {name!r} has shape {list(ref.shape)}, "
                                  f"config.json implies {list(shape)}")
        out[name] = ref
    dtypes = sorted({ref.dtype for ref in out.values()})
    if len(dtypes) > 1:
        odd = next(n for n, r in out.items() if r.dtype != max(dtypes, key=[r.dtype for r in out.values()].count))
        raise CheckpointError(f"{directory}: tensors have mixed dtypes {dtypes} (e.g. {odd!r}); planc needs one dtype "
                              "per checkpoint (save it with a single torch_dtype)")
    missing = [n for n, (_, required) in expected.items() if required and n not in out]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise CheckpointError(f"{directory}: missing tensors {', '.join(missing[:3])}{more}")
    return out
