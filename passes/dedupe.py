"""dedupe: the block zoo (each unique block once) and one chain per variant.

A block is unique by key = sha256(structure hash, weight hash). Full-weight variants' chains
are their own block keys (shared wherever equal to another model's); a LoRA variant's chain is
the base's blocks with its adapter delta attached to the blocks the adapter touches.
"""
from __future__ import annotations

import hashlib

from planc.ir import AdapterDelta, Chain, ChainLink, ZooBlock
from planc.pass_manager import Pass, PassContext
from planc.program import Program


class DedupePass(Pass):
    """With ``share_across_models=False`` every model keeps its own copy of every block and of
    every tensor in it: the one-model-per-fine-tune baseline that benchmarks compare against."""

    name = "dedupe"
    requires = ("fingerprints", "adapter_deltas")
    provides = ("zoo", "adapter_zoo", "chains")

    def __init__(self, share_across_models: bool = True):
        self.share_across_models = share_across_models

    def run(self, program: Program, ctx: PassContext) -> bool:
        share = ctx.options_for(self.name).get("share_across_models", self.share_across_models)
        zoo: dict[str, ZooBlock] = {}
        adapter_zoo: dict[str, AdapterDelta] = {}
        chains: dict[str, Chain] = {}
        base_name = program.spec.base.name
        for name, entry in program.models.items():
            specs = program.blocks[name]
            links = []
            deltas = program.adapter_deltas.get(name, {})
            for spec, fp in zip(specs, program.fingerprints[name]):
                key = fp.key if share else hashlib.sha256(f"{name}:{fp.key}".encode()).hexdigest()
                block = zoo.get(key)
                if block is None:
                    # Not sharing means not sharing tensors either: make their content ids per model.
                    tensors = fp.tensors if share else tuple(
                        (rel, hashlib.sha256(f"{name}:{cid}".encode()).hexdigest(), n) for rel, cid, n in fp.tensors)
                    block = zoo[key] = ZooBlock(key, spec.name, spec.kind, spec.index, fp.structure_hash,
                                                fp.weight_hash, fp.nbytes, fp.num_params, source=name,
                                                tensors=tensors)
                block.users.append(name)
                delta = deltas.get(spec.name)
                if delta is not None:
                    adapter_zoo.setdefault(delta.key, delta)
                links.append(ChainLink(key, delta.key if delta else None))
            chains[name] = Chain(name, _kind(entry.kind, name == base_name, links, chains.get(base_name)), links)
        program.zoo, program.adapter_zoo, program.chains = zoo, adapter_zoo, chains
        return True


def _kind(entry_kind: str, is_base: bool, links: list[ChainLink], base: Chain | None) -> str:
    if is_base:
        return "base"
    if entry_kind == "adapter":
        return "lora"
    shared = sum(a.block == b.block for a, b in zip(links, base.links)) if base else 0
    if base and shared == len(links):
        return "identical"
    return "partial" if shared else "full"
