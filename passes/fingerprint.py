"""fingerprint: the identity of every block of every model, without loading a model.

- structure hash: sha256 of the block's canonical graph — ops, targets relative to the block,
  argument wiring, constants, module settings, parameter shapes/dtypes, and the values of
  config-derived buffers (rotary frequencies). Equal structure hashes compute the same function of
  (input, weights); the layer's position in the model does not enter it.
- weight hash: sha256 over the block's tensors — relative name, dtype, shape and raw bytes — read
  one tensor at a time from the checkpoint (memory stays flat however many variants there are).
  Tied tensors enter as a reference to the tying block's weight hash.

LoRA variants get an AdapterDelta per block their adapter touches, hashed the same way.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Iterable

import torch
import torch.fx

from planc.errors import PlancError
from planc.ir import AdapterDelta, BlockFingerprint, BlockSpec, LoraDelta
from planc.models.checkpoint import Checkpoint
from planc.models.lora import Adapter
from planc.models.safetensors_index import TensorRef
from planc.pass_manager import Pass, PassContext
from planc.passes.partition import HFBlockPolicy
from planc.program import Program


def _fn_name(fn: Any) -> str:
    return f"{getattr(fn, '__module__', None) or type(fn).__module__}.{getattr(fn, '__qualname__', repr(fn))}"


def _canon(value: Any, index: dict[torch.fx.Node, int]) -> str:
    if isinstance(value, torch.fx.Node):
        return f"%{index[value]}" if value in index else "%in"
    if isinstance(value, (list, tuple)):
        inner = ",".join(_canon(v, index) for v in value)
        return f"[{inner}]" if isinstance(value, list) else f"({inner})"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_canon(v, index)}" for k, v in sorted(value.items())) + "}"
    if isinstance(value, slice):
        return f"slice({_canon(value.start, index)},{_canon(value.stop, index)},{_canon(value.step, index)})"
    if isinstance(value, float):
        return value.hex()
    if callable(value) and not isinstance(value, torch.dtype):
        return _fn_name(value)
    return repr(value)


def structure_hash(spec: BlockSpec, policy: HFBlockPolicy | None = None) -> str:
    """sha256 of the block's canonical graph (see module docstring)."""
    policy = policy or HFBlockPolicy()
    gm = spec.graph
    h = hashlib.sha256(f"kind={spec.kind}".encode())
    index: dict[torch.fx.Node, int] = {}
    for i, node in enumerate(gm.graph.nodes):
        index[node] = i
        if node.op in ("call_module", "get_attr"):
            target = policy.relative_name(str(node.target))
        elif node.op == "call_function":
            target = _fn_name(node.target)
        else:
            target = "" if node.op in ("placeholder", "output") else str(node.target)
        line = f"{node.op}|{target}|{_canon(node.args, index)}|{_canon(node.kwargs, index)}"
        if node.op == "call_module":
            mod = gm.get_submodule(str(node.target))
            line += f"|{type(mod).__module__}.{type(mod).__qualname__}({mod.extra_repr()})"
            line += "".join(f"|{n}:{p.dtype}:{list(p.shape)}" for n, p in mod.named_parameters(remove_duplicate=False))
        elif node.op == "get_attr":
            line += _attr_signature(gm, str(node.target))
        h.update(line.encode() + b"\n")
    for rel, (other, other_rel) in sorted(spec.ties.items()):
        h.update(f"tie|{rel}|{other}|{other_rel}\n".encode())
    return h.hexdigest()


def _attr_signature(gm: torch.fx.GraphModule, target: str) -> str:
    t = gm.get_parameter(target) if target in dict(gm.named_parameters()) else gm.get_buffer(target)
    sig = f"|{t.dtype}:{list(t.shape)}"
    if isinstance(t, torch.nn.Parameter) or t.is_meta:
        return sig
    # Config-derived constant (e.g. rotary inv_freq): its values decide the output.
    return sig + "|" + hashlib.sha256(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def tensor_hash(ref: TensorRef) -> str:
    h = hashlib.sha256()
    for chunk in ref.chunks():
        h.update(chunk)
    return h.hexdigest()


def content_id(ref: TensorRef, digest: str) -> str:
    """Identity of one tensor's value: dtype, shape and bytes."""
    return hashlib.sha256(f"{ref.dtype}|{list(ref.shape)}|{digest}".encode()).hexdigest()


def weight_hash(items: Iterable[tuple[str, TensorRef, str]], ties: dict[str, str]) -> str:
    """sha256 over (relative name, dtype, shape, content hash) of each tensor, plus tied weight hashes."""
    h = hashlib.sha256()
    for rel, ref, digest in sorted(items, key=lambda t: t[0]):
        h.update(f"{rel}|{ref.dtype}|{list(ref.shape)}|{digest}\n".encode())
    for rel, tied in sorted(ties.items()):
        h.update(f"tie|{rel}|{tied}\n".encode())
    return h.hexdigest()


def fingerprint_model(ckpt: Checkpoint, specs: list[BlockSpec], structures: dict[int, str],
                      digest: "hashlib._Hash") -> list[BlockFingerprint]:
    out: list[BlockFingerprint] = []
    weight_of: dict[str, str] = {}
    for spec in specs:
        items = []
        for rel, name in spec.params.items():
            ref = ckpt.tensors[name]
            th = tensor_hash(ref)
            digest.update(f"{name}|{ref.dtype}|{list(ref.shape)}|{th}\n".encode())
            items.append((rel, ref, th))
        ties = {rel: weight_of[other] + ":" + other_rel for rel, (other, other_rel) in spec.ties.items()}
        wh = weight_hash(items, ties)
        weight_of[spec.name] = wh
        out.append(BlockFingerprint(
            block=spec.name, structure_hash=structures[id(spec)], weight_hash=wh,
            nbytes=sum(r.nbytes for _, r, _ in items),
            num_params=sum(int(torch.Size(r.shape).numel()) for _, r, _ in items),
            tensors=tuple(sorted((rel, content_id(r, th), r.nbytes) for rel, r, th in items))))
    return out


def adapter_deltas(adapter: Adapter, specs: list[BlockSpec], policy: HFBlockPolicy,
                   digest: "hashlib._Hash") -> dict[str, AdapterDelta]:
    by_block: dict[str, list[LoraDelta]] = {}
    spec_names = {(s.kind, s.index): s.name for s in specs}
    for module, lm in adapter.modules.items():
        block = policy.block_of(module)
        assert block is not None and block in spec_names, module
        by_block.setdefault(spec_names[block], []).append(
            LoraDelta(policy.relative_name(module), lm.a, lm.b, lm.rank, lm.scaling))
    out = {}
    for block, deltas in by_block.items():
        h = hashlib.sha256(b"lora\n")
        for d in sorted(deltas, key=lambda d: d.module):
            ha, hb = tensor_hash(d.a), tensor_hash(d.b)
            line = f"{d.module}|{d.rank}|{d.scaling.hex()}|{d.a.dtype}|{ha}|{d.b.dtype}|{hb}\n"
            h.update(line.encode())
            digest.update(f"{block}|{line}".encode())
        out[block] = AdapterDelta(block, h.hexdigest(), tuple(sorted(deltas, key=lambda d: d.module)),
                                  sum(d.a.nbytes + d.b.nbytes for d in deltas))
    return out


def _config_digest(raw: dict) -> "hashlib._Hash":
    return hashlib.sha256(json.dumps(raw, sort_keys=True).encode())


class FingerprintPass(Pass):
    name = "fingerprint"
    requires = ("blocks",)
    provides = ("fingerprints", "adapter_deltas", "input_digests")

    def __init__(self, policy: HFBlockPolicy | None = None):
        self.policy = policy or HFBlockPolicy()

    def run(self, program: Program, ctx: PassContext) -> bool:
        structures: dict[int, str] = {}
        for specs in program.blocks.values():
            for spec in specs:
                if id(spec) not in structures:
                    structures[id(spec)] = structure_hash(spec, self.policy)
        fingerprints, deltas, digests = {}, {}, {}
        cache: dict[int, tuple[list[BlockFingerprint], str]] = {}
        for name, entry in program.models.items():
            ckpt = entry.checkpoint
            if not ckpt.tensors:
                raise PlancError(f"model {name!r} was loaded without weights (planc.load(..., weights=False)); "
                                 "fingerprint needs them — plan-only pipelines stop before this pass")
            if id(ckpt) not in cache:  # adapter variants reuse the base's fingerprints
                d = _config_digest(ckpt.raw_config)
                fps = fingerprint_model(ckpt, program.blocks[name], structures, d)
                cache[id(ckpt)] = (fps, d.hexdigest())
            fingerprints[name], digests[name] = cache[id(ckpt)]
            if entry.adapter is not None:
                d = hashlib.sha256(digests[name].encode())
                deltas[name] = adapter_deltas(entry.adapter, program.blocks[name], self.policy, d)
                digests[name] = d.hexdigest()
        program.fingerprints, program.adapter_deltas, program.input_digests = fingerprints, deltas, digests
        return True
