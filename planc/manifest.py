"""The shape of a bundle's manifest.json, checked whenever a bundle is opened.

manifest.json is not covered by a hash (it holds the hashes), so an edited one is bad input like
any other: it is validated here and refused with one line, never followed blindly (paths must
stay inside the bundle).
"""
from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from planc.errors import BundleError


class _Loose(BaseModel):
    model_config = ConfigDict(extra="allow")


def _inside(path: str) -> str:
    p = PurePosixPath(path)
    if p.is_absolute() or ".." in p.parts or not p.parts:
        raise ValueError(f"path {path!r} leaves the bundle")
    return path


class TensorLocation(_Loose):
    file: str
    name: str
    _check = field_validator("file")(classmethod(lambda cls, v: _inside(v)))


class BlockEntry(_Loose):
    key: str
    name: str
    kind: Literal["embedding", "layer", "head"]
    index: int = Field(ge=0)
    file: Optional[str]
    sha256: Optional[str]
    file_bytes: int = Field(ge=0)
    ties: dict[str, tuple[str, str]]
    tensors: dict[str, TensorLocation]
    users: list[str]
    nbytes: int = Field(ge=0)
    num_params: int = Field(ge=0)

    @field_validator("file")
    @classmethod
    def _file_inside(cls, v: Optional[str]) -> Optional[str]:
        return None if v is None else _inside(v)


class AdapterModule(_Loose):
    module: str
    rank: int = Field(ge=1)
    scaling: float


class AdapterEntry(_Loose):
    key: str
    block: str
    file: str
    sha256: str
    file_bytes: int = Field(ge=0)
    nbytes: int = Field(ge=0)
    modules: list[AdapterModule]
    _check = field_validator("file")(classmethod(lambda cls, v: _inside(v)))


class ChainLink(_Loose):
    block: str
    adapter: Optional[str]


class Generation(_Loose):
    bos_token_id: Optional[int]
    eos_token_ids: list[int]
    pad_token_id: Optional[int]


class VariantEntry(_Loose):
    name: str
    kind: str
    chain: list[ChainLink] = Field(min_length=1)
    tokenizer: str
    generation: Generation
    _check = field_validator("tokenizer")(classmethod(lambda cls, v: _inside(v)))


class TokenizerEntry(_Loose):
    dir: str
    files: dict[str, str]
    _check = field_validator("dir")(classmethod(lambda cls, v: _inside(v)))


class Manifest(_Loose):
    format_version: Literal[2]
    planc_version: str
    architecture: dict
    blocks: list[BlockEntry]
    adapters: list[AdapterEntry]
    tokenizers: dict[str, TokenizerEntry]
    variants: list[VariantEntry] = Field(min_length=1)
    serving: dict = Field(default_factory=dict)
    tenants: list[dict] = Field(default_factory=list)


def validate_manifest(data: dict, path: Path) -> dict:
    """The manifest as plain JSON data, after checking its shape and cross-references."""
    try:
        Manifest.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        raise BundleError(f"{path}: malformed manifest at {loc}: {first['msg']}") from None
    blocks = {b["key"] for b in data["blocks"]}
    adapters = {a["key"] for a in data["adapters"]}
    lengths = {len(v["chain"]) for v in data["variants"]}
    if len(lengths) != 1:
        raise BundleError(f"{path}: malformed manifest: chains of different lengths")
    for v in data["variants"]:
        for link in v["chain"]:
            if link["block"] not in blocks or (link["adapter"] and link["adapter"] not in adapters):
                raise BundleError(f"{path}: malformed manifest: variant {v['name']} names a block or adapter "
                                  "the manifest does not list")
    return data


def is_planc_manifest(path: Path) -> bool:
    """Whether `path` is a manifest.json written by planc (used before replacing a directory)."""
    import json

    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "format_version" in data and "planc_version" in data and "blocks" in data
