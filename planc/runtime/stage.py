"""A stage: the blocks at a contiguous range of chain positions, with their KV cache and adapters.

The stage is the unit a backend places (one process here; a Ray actor in the ray backend). The
engine talks to stages only through this interface — plain tensors and small dataclasses in and
out — so it never assumes that all stages share its address space.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from planc.bundle import Bundle
from planc.errors import PlancError
from planc.kernels import KernelSelection, use_kernels
from planc.runtime import executor as ex
from planc.runtime.file_rows import FileRows
from planc.runtime.kv_cache import KVCache
from planc.runtime.tensor_parallel import TensorParallel


class StageFailed(RuntimeError):
    """A stage's process died or restarted, taking the KV cache of its sequences with it.

    Raised by stages that live in another process; the engine recomputes the sequences once the
    stage answers again, and fails them (HTTP 503) if it stays away too long.
    """


@dataclass
class BlockCall:
    """One batched call of one block instance: the sequences whose chains run `key` at `position`."""

    position: int
    key: str
    segments: list[ex.Segment]


class PendingCalls:
    """A stage's answer to `submit_calls`, ready or on its way."""

    def __init__(self, out: dict[int, torch.Tensor]):
        self._out = out

    def result(self) -> dict[int, torch.Tensor]:
        return self._out


class Stage:
    concurrent = False
    """Whether `submit_calls` returns before the work is done (the stage computes beside the engine).
    The engine pipelines steps through stages only when every stage is concurrent."""

    def __init__(self, bundle: Bundle, positions: range, kv_cache_bytes: int, page_size: int,
                 kernels: Optional[KernelSelection] = None, variants: Optional[list[str]] = None,
                 tensor_parallel: Optional[TensorParallel] = None):
        """`variants`: load only these variants' blocks (a copy of one plan group); default: all.
        `tensor_parallel`: this stage is one rank of a tensor-parallel copy: it reads its part of every block
        from the files (`Bundle.block_shard`) and keeps its KV heads' share of the cache (and of
        `kv_cache_bytes`). Its calls must run on every rank at once."""
        self.positions = positions
        self.tp = tensor_parallel
        if tensor_parallel is not None:
            tensor_parallel.check(bundle.arch, str(bundle.root))
        self.kinds: dict[int, str] = {}
        self.modules: dict[str, torch.nn.Module] = {}
        self.adapters: dict[str, ex.AdapterTensors] = {}
        self.file_rows: dict[str, FileRows] = {}
        """Embedding block key -> its table read row by row from the bundle file (see file_rows)."""
        for name in variants or bundle.variants:
            self._load(bundle, name)
        self.layers = [p - 1 for p in positions if self.kinds.get(p) == "layer"]
        param = next(next(iter(self.modules.values())).parameters())
        dtype = param.dtype
        # The stage, not the engine, holds the kernel selection: a stage may run in another process.
        self.kernels = _kernel_selection(kernels, param.device)
        arch = bundle.arch
        share = self.tp.size if self.tp is not None else 1
        self.cache = KVCache.for_budget(kv_cache_bytes // share, page_size, arch.num_kv_heads // share, arch.head_dim,
                                        dtype) if self.layers else None
        if self.tp is not None:
            bundle.forget_loaded()  # the adapters' files, read whole; this rank keeps its parts

    def _load(self, bundle: Bundle, variant: str) -> None:
        loaded: dict[str, torch.nn.Module] = {}
        chain = bundle.variant(variant)["chain"]
        # a tensor-parallel rank reads its part of every tensor (a tied one too) from the files
        tie_targets = {name for name, _ in self._tie_targets(bundle, variant)} if self.tp is None else set()
        keys = {bundle.blocks[link["block"]]["name"]: link["block"] for link in chain}
        for position, link in enumerate(chain):
            entry = bundle.blocks[link["block"]]
            in_stage = position in self.positions
            if not in_stage and entry["name"] not in tie_targets:
                continue  # neither ours nor tied to one of ours
            if self.tp is None:
                module = bundle.block_module(link["block"], loaded)  # loaded once per bundle, shared
                loaded[entry["name"]] = module
                if not in_stage:
                    continue
            elif link["block"] in self.modules:  # another variant's chain runs it too
                module = self.modules[link["block"]]
            else:  # this rank's part, read from the files
                module = bundle.block_shard(link["block"], self.tp, keys)
            self.kinds[position] = entry["kind"]
            self.modules[link["block"]] = module
            if self.tp is None and entry["kind"] == "embedding" and link["block"] not in self.file_rows:
                rows = _file_rows(bundle, link["block"], module)
                if rows is not None:
                    self.file_rows[link["block"]] = rows
            if link["adapter"] and link["adapter"] not in self.adapters:
                deltas = bundle.adapter_deltas(link["adapter"])
                self.adapters[link["adapter"]] = self.tp.shard_adapter(deltas, bundle.arch) if self.tp else deltas

    def _tie_targets(self, bundle: Bundle, variant: str) -> list[tuple[str, str]]:
        """(block name, tensor) that blocks of this stage tie to (e.g. the head to the embedding)."""
        out = []
        for position, link in enumerate(bundle.variant(variant)["chain"]):
            if position in self.positions:
                out.extend(tuple(t) for t in bundle.blocks[link["block"]]["ties"].values())
        return out

    # ------------------------------------------------------------------ KV
    # `variant` is the sequence's: a stage made of several plan groups keeps its KV where the
    # variant's blocks run. An in-process stage holds every variant's blocks and ignores it.
    def extra_pages(self, seq: int, num_tokens: int) -> int:
        return self.cache.extra_pages(seq, self.layers, num_tokens) if self.cache else 0

    def free_pages(self) -> int:
        return self.cache.num_free if self.cache else 1 << 62

    def can_reserve(self, seq: int, num_tokens: int, variant: Optional[str] = None) -> bool:
        return self.extra_pages(seq, num_tokens) <= self.free_pages()

    def reserve(self, seq: int, num_tokens: int, variant: Optional[str] = None) -> bool:
        return self.cache.reserve(seq, self.layers, num_tokens) if self.cache else True

    def free(self, seq: int) -> None:
        if self.cache:
            self.cache.free(seq)

    def capacity_tokens(self) -> int:
        if not self.cache:
            return 1 << 62
        return (self.cache.num_pages // len(self.layers)) * self.cache.page_size

    def usage(self) -> float:
        return self.cache.usage() if self.cache else 0.0

    # ------------------------------------------------------------------ compute
    @torch.no_grad()
    def run(self, position: int, key: str, x: torch.Tensor, segments: list[ex.Segment]) -> torch.Tensor:
        """Run block `key` at chain `position` on a ragged batch: token ids or hidden -> hidden or logits."""
        module, kind = self.modules[key], self.kinds[position]
        batch = ex.RaggedBatch(segments)
        with use_kernels(self.kernels):
            if kind == "embedding":
                rows = self.file_rows.get(key)
                return rows(x) if rows is not None else ex.run_embedding(module, x, self.tp)
            if kind == "layer":
                return ex.run_layer(module, position - 1, x, batch, self.cache, self.adapters, self.tp)
            return ex.run_head(module, x, batch, self.tp)

    def run_calls(self, calls: list[BlockCall], inputs: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """Run this stage's block calls of one step in order, each sequence's output feeding its next call.

        `inputs`: sequence -> token ids (first stage) or hidden (tokens, hidden). Returns each sequence's
        output after its last call here: hidden, or after the head the logits of its last token. One
        call per stage and step is what lets a stage live in another process at a bearable cost.
        """
        out = dict(inputs)
        for call in calls:
            x = torch.cat([out[seg.seq] for seg in call.segments])
            y = self.run(call.position, call.key, x, call.segments)
            head = self.kinds[call.position] == "head"  # y: one row of logits per sequence
            for i, seg in enumerate(call.segments):
                out[seg.seq] = y[i] if head else y[seg.start:seg.start + seg.length]
        return out


    def submit_calls(self, calls: list[BlockCall], inputs: dict[int, torch.Tensor]) -> PendingCalls:
        """`run_calls`, for the engine's pipelined path; in process it is done on return."""
        return PendingCalls(self.run_calls(calls, inputs))


def _file_rows(bundle: Bundle, key: str, module: torch.nn.Module) -> Optional[FileRows]:
    """The embedding's rows read from its file, where only lookups read the table: not when the head
    ties to it (its matmul reads the whole table every step) or when it is not a CPU tensor."""
    rel = "embed_tokens.weight"
    weight = module.get_parameter(rel)
    if weight.device.type != "cpu" or bundle.read_by_other_blocks(key, rel):
        return None
    ref = bundle.tensor_ref(key, rel)
    if ref.shape != tuple(weight.shape) or ref.torch_dtype != weight.dtype:
        return None  # the module holds something else than the stored tensor
    return FileRows(ref)


def _kernel_selection(kernels: Optional[KernelSelection], device: torch.device) -> KernelSelection:
    """The given selection, else $PLANC_KERNELS's; refused here if it forces what cannot run."""
    try:
        kernels = kernels or KernelSelection.from_env()
        kernels.check(device)
    except ValueError as exc:
        raise PlancError(f"kernels: {exc}") from None
    return kernels


def split_positions(num_positions: int, num_stages: int) -> list[range]:
    """Contiguous, near-equal ranges of chain positions."""
    assert 1 <= num_stages <= num_positions
    bounds = [round(i * num_positions / num_stages) for i in range(num_stages + 1)]
    return [range(bounds[i], bounds[i + 1]) for i in range(num_stages)]


def local_stages(bundle: Bundle, kv_cache_bytes: int, page_size: int, num_stages: int = 1,
                 positions: Optional[list[range]] = None, kernels: Optional[KernelSelection] = None) -> list[Stage]:
    """In-process stages; the KV budget is split in proportion to each stage's layers."""
    num_positions = len(next(iter(bundle.variants.values()))["chain"])
    ranges = positions or split_positions(num_positions, num_stages)
    num_layers = bundle.arch.num_layers
    stages = []
    for r in ranges:
        layers = sum(1 for p in r if 0 < p <= num_layers)
        stages.append(Stage(bundle, r, max(1, kv_cache_bytes * layers // num_layers), page_size, kernels))
    return stages
