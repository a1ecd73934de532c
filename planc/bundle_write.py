"""Write the backend-independent part of a bundle: blocks, adapters, tokenizers, manifest.

Every unique block is written once to ``blocks/<sha256>.safetensors`` (tensor names relative to
the block), every unique adapter delta to ``adapters/<sha256>.safetensors``, each distinct set of
tokenizer files to ``tokenizers/<sha256>/``. The manifest is JSON with sorted keys and no
timestamps or absolute paths: the same inputs give a byte-identical manifest.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

from safetensors.torch import save_file

import planc
from planc.ir import AdapterDelta, ZooBlock
from planc.program import Program
from planc.store import file_sha256, store_file

FORMAT_VERSION = 2  # 2: blocks list their tensors (tensor-level sharing)
MANIFEST = "manifest.json"

Progress = Optional[Callable[[str], None]]


def write_blocks(program: Program, root: Path, progress: Progress = None) -> dict[str, dict[str, Any]]:
    """Write each zoo block once, reading one block's tensors at a time from its source checkpoint.

    A tensor equal to one an earlier block already stored (e.g. the frozen MLP of a layer whose
    attention was fine-tuned) is not written again: the block's entry points at the earlier file.
    """
    (root / "blocks").mkdir()
    out: dict[str, dict[str, Any]] = {}
    stored_at: dict[str, dict[str, str]] = {}  # content id -> {"file", "name"}
    for key, block in program.zoo.items():
        spec = _spec_of(program, block)
        ckpt = program.models[block.source].checkpoint
        ids = {rel: cid for rel, cid, _ in block.tensors}
        own = {rel: ckpt.tensors[name].read() for rel, name in sorted(spec.params.items()) if ids[rel] not in stored_at}
        entry: dict[str, Any] = {"file": None, "sha256": None, "file_bytes": 0,
                                 "ties": {rel: list(t) for rel, t in sorted(spec.ties.items())}}
        if own:
            tmp = root / "blocks" / f".{key}.partial"
            save_file(own, str(tmp), metadata=_file_metadata(block.name, key))
            digest, final = store_file(tmp, root / "blocks", "safetensors")
            entry.update(file=f"blocks/{final.name}", sha256=digest, file_bytes=final.stat().st_size)
            for rel in own:
                stored_at.setdefault(ids[rel], {"file": entry["file"], "name": rel})
        del own
        entry["tensors"] = {rel: stored_at[ids[rel]] for rel in sorted(ids)}
        out[key] = entry
        if progress:
            progress(block.name)
    return out


def write_adapters(program: Program, root: Path, progress: Progress = None) -> dict[str, dict[str, Any]]:
    (root / "adapters").mkdir()
    out = {}
    for key, delta in program.adapter_zoo.items():
        tensors = {}
        for d in delta.modules:
            tensors[f"{d.module}.lora_A"] = d.a.read()
            tensors[f"{d.module}.lora_B"] = d.b.read()
        tmp = root / "adapters" / f".{key}.partial"
        save_file(tensors, str(tmp), metadata=_file_metadata(delta.block, key))
        digest, final = store_file(tmp, root / "adapters", "safetensors")
        out[key] = {"file": f"adapters/{final.name}", "sha256": digest, "file_bytes": final.stat().st_size}
        if progress:
            progress(f"adapter on {delta.block}")
    return out


def write_tokenizers(program: Program, root: Path) -> tuple[dict[str, dict], dict[str, str]]:
    """Copy each distinct tokenizer file set once; returns (table, model name -> directory)."""
    (root / "tokenizers").mkdir()
    table: dict[str, dict] = {}
    of_model = {}
    for name, entry in program.models.items():
        files = {p.name: file_sha256(p) for p in entry.tokenizer}
        digest = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
        directory = f"tokenizers/{digest}"
        if digest not in table:
            (root / directory).mkdir()
            for p in entry.tokenizer:
                shutil.copyfile(p, root / directory / p.name)
            table[digest] = {"dir": directory, "files": files}
        of_model[name] = directory
    return table, of_model


def build_manifest(program: Program, backend: str, blocks: dict, adapters: dict, tokenizers: dict,
                   tokenizer_of: dict[str, str], entry_points: dict[str, str], settings: dict) -> dict:
    spec_root = program.spec.root
    zoo, adapter_zoo = program.zoo, program.adapter_zoo
    variants = []
    for name, chain in program.chains.items():
        entry = program.models[name]
        gen = entry.checkpoint.generation
        source = entry.adapter.directory if entry.adapter else entry.checkpoint.directory
        variants.append({
            "name": name,
            "kind": chain.kind,
            "chain": [{"block": link.block, "adapter": link.adapter} for link in chain.links],
            "tokenizer": tokenizer_of[name],
            "generation": {"bos_token_id": gen.bos_token_id, "eos_token_ids": list(gen.eos_token_ids),
                           "pad_token_id": gen.pad_token_id},
            "logical_bytes": _chain_bytes(chain, zoo, adapter_zoo),
            "input": {"field": entry.field, "path": _rel(source, spec_root),
                      "digest": program.input_digests[name]},
        })
    unique_tensors = {cid: n for b in zoo.values() for _, cid, n in b.tensors}
    unique_param_bytes = sum(unique_tensors.values()) + sum(d.nbytes for d in adapter_zoo.values())
    # A file shared by two entries (equal content) is one file on disk: count each file once.
    files = {e["file"]: e["file_bytes"] for e in list(blocks.values()) + list(adapters.values()) if e["file"]}
    stored = sum(files.values())
    logical = sum(v["logical_bytes"] for v in variants)
    return {
        "format_version": FORMAT_VERSION,
        "planc_version": planc.__version__,
        "backend": backend,
        "architecture": program.base.checkpoint.arch.to_json(),
        "settings": settings,
        "entry_points": entry_points,
        "blocks": [_block_entry(b, blocks[k]) for k, b in zoo.items()],
        "adapters": [_adapter_entry(d, adapters[k]) for k, d in adapter_zoo.items()],
        "tokenizers": tokenizers,
        "variants": variants,
        "annotations": _annotations(program),
        "serving": program.spec.serving.model_dump(exclude_unset=True),  # what the spec sets; the runtime defaults the rest
        "tenants": [t.model_dump() for t in program.spec.tenants],
        "plan": program.plan.to_json() if program.plan is not None else None,
        "totals": {
            "logical_bytes": logical,
            "unique_param_bytes": unique_param_bytes,
            "stored_bytes": stored,
            "dedupe_ratio": round(logical / stored, 4) if stored else 0.0,
        },
    }


_OWN_EXTRAS = {"kernel_configs", "plan_inputs"}
"""Extras planc's own passes write and the manifest stores elsewhere (kernels.json, the plan)."""


def _annotations(program: Program) -> dict[str, Any]:
    """Results of user passes (Program.extras) that are plain JSON values, kept in the manifest."""
    out = {}
    for name, value in sorted(program.extras.items()):
        if name in _OWN_EXTRAS:
            continue
        try:
            json.dumps(value, sort_keys=True)
        except (TypeError, ValueError):
            continue
        out[name] = value
    return out


def write_kernel_configs(program: Program, root: Path) -> Optional[dict]:
    """kernels.json from the tune_kernels pass (op -> shape class -> config), when it ran."""
    configs = program.extras.get("kernel_configs")
    if configs is None:
        return None
    path = root / "kernels.json"
    path.write_text(json.dumps(configs, indent=2, sort_keys=True) + "\n")
    return {"file": "kernels.json", "sha256": file_sha256(path)}


def write_manifest(root: Path, manifest: dict) -> None:
    text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    tmp = root / f".{MANIFEST}.partial"
    tmp.write_text(text)
    os.replace(tmp, root / MANIFEST)


def _file_metadata(block: str, key: str) -> dict[str, str]:
    # One key only: safetensors writes a multi-key metadata map in no fixed order, and the
    # file's sha256 (its name) must not depend on that.
    return {"planc": json.dumps({"block": block, "key": key}, sort_keys=True)}


def _spec_of(program: Program, block: ZooBlock):
    return next(s for s in program.blocks[block.source] if s.name == block.name)


def _chain_bytes(chain, zoo: dict[str, ZooBlock], adapter_zoo: dict[str, AdapterDelta]) -> int:
    return sum(zoo[link.block].nbytes + (adapter_zoo[link.adapter].nbytes if link.adapter else 0)
               for link in chain.links)


def _block_entry(b: ZooBlock, written: dict) -> dict:
    return {"key": b.key, "name": b.name, "kind": b.kind, "index": b.index,
            "structure_hash": b.structure_hash, "weight_hash": b.weight_hash,
            "nbytes": b.nbytes, "num_params": b.num_params, "users": list(b.users), **written}


def _adapter_entry(d: AdapterDelta, written: dict) -> dict:
    return {"key": d.key, "block": d.block, "nbytes": d.nbytes,
            "modules": [{"module": m.module, "rank": m.rank, "scaling": m.scaling} for m in d.modules], **written}


def _rel(path: Path, root: Path) -> str:
    try:
        return os.path.relpath(Path(path).resolve(), Path(root).resolve())
    except ValueError:  # another drive on Windows
        return str(path)
