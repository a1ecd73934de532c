"""Open a bundle, verify every file against its hash, and load variants' chains.

>>> bundle = Bundle.open("bundle/")                  # doctest: +SKIP
>>> model = bundle.load_chain("legal")               # doctest: +SKIP
>>> logits = model(torch.tensor([[1, 2, 3]]))        # doctest: +SKIP
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch
from safetensors.torch import load_file
from torch import nn

from planc.bundle_write import FORMAT_VERSION, MANIFEST
from planc.chain import ChainModel, block_skeleton, build_block
from planc.models.lora import with_lora
from planc.errors import BundleError
from planc.jsonfile import read_json_object
from planc.manifest import validate_manifest
from planc.models.config import ArchConfig
from planc.models.safetensors_index import TensorRef, read_header
from planc.plan import Plan
from planc.store import verify_file

if TYPE_CHECKING:
    from planc.runtime.tensor_parallel import TensorParallel


class Bundle:
    def __init__(self, root: Path, manifest: dict[str, Any]):
        self.root = root
        self.manifest = manifest
        self.arch = ArchConfig.from_json(manifest["architecture"])
        self.blocks = {b["key"]: b for b in manifest["blocks"]}
        self.adapters = {a["key"]: a for a in manifest["adapters"]}
        self.variants = {v["name"]: v for v in manifest["variants"]}
        self.plan = Plan.from_json(manifest["plan"]) if manifest.get("plan") else None
        """The deployment `planc compile --cluster` chose (None when compiled without a cluster)."""
        self._modules: dict[str, nn.Module] = {}
        self._files: dict[str, dict[str, torch.Tensor]] = {}

    @classmethod
    def open(cls, root: str | Path, verify: bool = True) -> "Bundle":
        """Read the manifest and (by default) check every stored file's sha256."""
        root = Path(root)
        path = root / MANIFEST
        manifest = read_json_object(path, BundleError, missing=f"{root}: not a planc bundle (no {MANIFEST})")
        version = manifest.get("format_version")
        if version != FORMAT_VERSION:
            raise BundleError(f"{path}: format_version {version!r}; this planc reads version {FORMAT_VERSION}")
        bundle = cls(root, validate_manifest(manifest, path))
        if verify:
            bundle.verify()
        return bundle

    def verify(self) -> None:
        for entry in list(self.blocks.values()) + list(self.adapters.values()):
            if entry["file"]:
                verify_file(self.root / entry["file"], entry["sha256"])
        for tok in self.manifest["tokenizers"].values():
            for name, digest in tok["files"].items():
                verify_file(self.root / tok["dir"] / name, digest)
        for extra in ("kernels", "report"):
            if self.manifest.get(extra):
                verify_file(self.root / self.manifest[extra]["file"], self.manifest[extra]["sha256"])

    def variant(self, name: str) -> dict[str, Any]:
        if name not in self.variants:
            raise BundleError(f"unknown variant {name!r}; this bundle serves {', '.join(self.variants)}")
        return self.variants[name]

    def tokenizer_dir(self, name: str) -> Path:
        return self.root / self.variant(name)["tokenizer"]

    def block_module(self, key: str, chain_modules: Optional[dict[str, nn.Module]] = None) -> nn.Module:
        """The loaded block for `key`, loaded once and shared. Tied tensors come from `chain_modules`
        (block name -> module already loaded for the same chain)."""
        if key not in self._modules:
            entry = self.blocks[key]
            # A tensor equal to one of another block is stored (and loaded) once, in that block's file.
            tensors = {rel: self._file(loc["file"])[loc["name"]] for rel, loc in entry["tensors"].items()}
            tied = {}
            for rel, (other, other_rel) in entry["ties"].items():
                if not chain_modules or other not in chain_modules:
                    raise BundleError(f"{self.root}: block {entry['name']} ties {rel} to block {other}, "
                                      "which precedes it in no chain")
                tied[rel] = chain_modules[other].get_parameter(other_rel)
            self._modules[key] = build_block(entry["kind"], entry["index"], self.arch, tensors, tied)
        return self._modules[key]

    def block_shard(self, key: str, tp: "TensorParallel", chain_keys: dict[str, str]) -> nn.Module:
        """One tensor-parallel rank's shard of a layer or head block (`TensorParallel.shard`), reading only its
        part of each tensor from the files: a rank never holds the whole block. A tied tensor is read where
        the block it ties to stores it (`chain_keys`: block name -> key, in the chain being loaded)."""
        from contextlib import ExitStack

        from safetensors import safe_open

        entry = self.blocks[key]
        locations = dict(entry["tensors"])
        for rel, (other, other_rel) in entry["ties"].items():
            locations[rel] = self.blocks[chain_keys[other]]["tensors"][other_rel]
        with ExitStack() as files:
            opened: dict[str, Any] = {}

            def read(name: str, part: Optional[tuple[int, slice]]) -> torch.Tensor:
                loc = locations[name]
                if loc["file"] not in opened:
                    opened[loc["file"]] = files.enter_context(safe_open(str(self.root / loc["file"]), framework="pt"))
                f = opened[loc["file"]]
                if part is None:
                    return f.get_tensor(loc["name"])
                dim, rows = part
                view = f.get_slice(loc["name"])
                return view[rows] if dim == 0 else view[:, rows]

            return tp.shard(entry["kind"], block_skeleton(entry["kind"], entry["index"], self.arch), read, self.arch)

    def _file(self, relpath: str) -> dict[str, torch.Tensor]:
        if relpath not in self._files:
            self._files[relpath] = load_file(str(self.root / relpath))
        return self._files[relpath]

    def tensor_ref(self, key: str, rel: str) -> TensorRef:
        """Where block `key`'s tensor `rel` (e.g. embed_tokens.weight) lies in the bundle's files."""
        loc = self.blocks[key]["tensors"][rel]
        return read_header(self.root / loc["file"])[loc["name"]]

    def read_by_other_blocks(self, key: str, rel: str) -> bool:
        """Whether a block other than `key` uses its tensor `rel`: tied to it, or stored once for both."""
        entry = self.blocks[key]
        loc = entry["tensors"][rel]
        for other in self.blocks.values():
            if other["key"] == key:
                continue
            if loc in other["tensors"].values() or [entry["name"], rel] in map(list, other["ties"].values()):
                return True
        return False

    def adapter_deltas(self, key: str) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
        """Module path inside the block (self_attn.q_proj) -> (A, B, scaling) of one stored adapter delta."""
        entry = self.adapters[key]
        tensors = self._file(entry["file"])
        return {m["module"]: (tensors[f"{m['module']}.lora_A"], tensors[f"{m['module']}.lora_B"], float(m["scaling"]))
                for m in entry["modules"]}

    def load_chain(self, name: str) -> ChainModel:
        variant = self.variant(name)
        loaded: dict[str, nn.Module] = {}
        modules = []
        for link in variant["chain"]:
            entry = self.blocks[link["block"]]
            block = self.block_module(link["block"], loaded)
            loaded[entry["name"]] = block
            if link["adapter"]:
                block = with_lora(block, self.adapter_deltas(link["adapter"]))
            modules.append(block)
        return ChainModel(modules)

    def forget_loaded(self) -> None:
        """Drop the loaded blocks and files (a tensor-parallel rank keeps only its shards of them)."""
        self._modules.clear()
        self._files.clear()

    @property
    def num_loaded_blocks(self) -> int:
        return len(self._modules)

    def eos_token_ids(self, name: str) -> list[int]:
        return list(self.variant(name)["generation"]["eos_token_ids"])


