"""Stages in Ray actors: the worker that holds one copy of a stage, and the proxy the engine calls.

A `StageWorker` actor loads the blocks of its variants at its chain positions and keeps the KV
cache of the sequences that pass through it. The engine (in the ingress) sees a `RemoteStage` with
the interface of `planc.runtime.stage.Stage`: per step one actor call per copy in use carries that
step's block calls, the hidden states in (one packed array) and the KV reservations since the last
call. KV accounting is mirrored in the proxy page for page (the same arithmetic as the cache), so
admission and preemption cost no remote call.

A copy laid out at tensor-parallel degree t is t actors, its ranks, each holding its part of the
blocks (`planc.runtime.tensor_parallel`) and meeting the others in a process group; each step's call
goes to all of them and rank 0 answers.

If an actor dies, Ray restarts it (max_restarts) with an empty cache. The proxy notices (a failed
call, or a new incarnation id) and raises `StageFailed`; the engine then recomputes the sequences,
and the proxy re-attaches to the restarted actor (a tensor-parallel copy's ranks meet again).
"""
from __future__ import annotations

import math
import os
import pickle
import time
import uuid
from dataclasses import dataclass
from typing import Optional

import numpy as np
import ray
import torch
from ray.exceptions import GetTimeoutError, RayActorError, RayError, RayTaskError

from planc.bundle import Bundle
from planc.runtime.executor import Segment
from planc.runtime.stage import BlockCall, Stage, StageFailed
from planc.net import free_port
from planc.runtime.tensor_parallel import GroupBroken, TensorParallel
from planc.store import verify_file


class StageRestarted(RuntimeError):
    """The actor is not the one the proxy attached to: Ray restarted it, and its KV is gone."""


Packed = tuple[list[int], list[int], np.ndarray, str]


def pack(tensors: dict[int, torch.Tensor]) -> Packed:
    """Per-sequence tensors as one array (numpy crosses Ray's serializer far faster than torch tensors)."""
    seqs = list(tensors)
    parts = [tensors[s] for s in seqs]
    joined = torch.cat([p.reshape(-1, *p.shape[1:]) for p in parts]) if parts else torch.empty(0)
    dtype = str(joined.dtype).removeprefix("torch.")
    if joined.dtype == torch.bfloat16:  # numpy has no bfloat16: ship the bits
        joined = joined.view(torch.int16)
    return seqs, [p.shape[0] for p in parts], joined.contiguous().numpy(), dtype


def unpack(packed: Packed) -> dict[int, torch.Tensor]:
    seqs, lengths, array, dtype = packed
    joined = torch.from_numpy(array)
    if dtype == "bfloat16":
        joined = joined.view(torch.bfloat16)
    return dict(zip(seqs, torch.split(joined, lengths))) if seqs else {}


class StageWorker:
    """One copy of one stage, in its own process (wrapped by ray.remote when started)."""

    def __init__(self, bundle_dir: str, positions: tuple[int, int], variants: list[str], kv_cache_bytes: int,
                 page_size: int, options: dict, tensor_parallel: Optional[tuple[int, int]] = None):
        """`tensor_parallel`: (rank, size) when this actor is one rank of a tensor-parallel copy (it holds its
        shard; `join_group` then joins it to the copy's other ranks)."""
        from planc.runtime.server import ServeOptions, kernel_selection

        opts = ServeOptions(**options)
        torch.set_num_threads(opts.threads)
        bundle = Bundle.open(bundle_dir, verify=False)
        _verify_own_files(bundle, range(*positions), variants)  # this node's copy of what this stage loads
        self.rank = tensor_parallel[0] if tensor_parallel else 0
        tp = TensorParallel(*tensor_parallel) if tensor_parallel and tensor_parallel[1] > 1 else None
        self.stage = Stage(bundle, range(*positions), kv_cache_bytes, page_size, kernel_selection(bundle, opts),
                           variants, tensor_parallel=tp)
        self.incarnation = uuid.uuid4().hex
        self.seqs: set[int] = set()

    def group_address(self) -> tuple[str, int]:
        """Where this copy's ranks meet (asked of rank 0): its node's address and a port free there."""
        address = ray.util.get_node_ip_address()
        return address, free_port(address)

    def join_group(self, address: str, port: int) -> str:
        """Join (or join again, after a rank restarted) the process group of this copy's ranks; every rank
        is called at once. Returns this rank's incarnation."""
        self.stage.tp.join(address, port)
        return self.incarnation

    def attach(self) -> dict:
        """Forget every sequence (the proxy's mirror starts empty) and describe this copy."""
        for seq in self.seqs:
            self.stage.free(seq)
        self.seqs.clear()
        cache = self.stage.cache
        return {"incarnation": self.incarnation, "pid": os.getpid(), "num_layers": len(self.stage.layers),
                "num_pages": cache.num_pages if cache else 0, "page_size": cache.page_size if cache else 1}

    def info(self) -> dict:
        """Who this is (for tests and operators); changes nothing."""
        tp = self.stage.tp
        return {"incarnation": self.incarnation, "pid": os.getpid(), "positions": list(self.stage.positions),
                "num_sequences": len(self.seqs), "node_id": ray.get_runtime_context().get_node_id(),
                "tensor_parallel": [tp.rank, tp.size] if tp else None,
                "parameters": sum(p.numel() for m in self.stage.modules.values() for p in m.parameters())}

    def run(self, request: bytes) -> bytes:
        """One step on this copy. In: pickled (incarnations of the copy's ranks, KV ops, block calls, packed
        inputs); out: pickled (packed outputs, seconds spent here). One bytes argument: Ray charges ~0.3 ms
        per argument it serializes itself, and this call is made once per stage and step. Every rank of a
        tensor-parallel copy gets the same request; rank 0 answers with the outputs, the others with none."""
        start = time.perf_counter()
        incarnations, ops, calls, inputs = pickle.loads(request)
        known = incarnations[self.rank]
        if known != self.incarnation:
            raise StageRestarted(f"incarnation {self.incarnation[:8]}, the proxy knows {known[:8]}")
        for op in ops:  # reservations the proxy's mirror already granted, in its order
            if op[0] == "reserve":
                assert self.stage.reserve(op[1], op[2]), "KV mirror out of step with the stage"
                self.seqs.add(op[1])
            else:
                self.stage.free(op[1])
                self.seqs.discard(op[1])
        outputs = self.stage.run_calls(calls, unpack(inputs))
        out = pack(outputs if self.rank == 0 else {})
        return pickle.dumps((out, time.perf_counter() - start), protocol=pickle.HIGHEST_PROTOCOL)


def _verify_own_files(bundle: Bundle, positions: range, variants: list[str]) -> None:
    entries = {}
    for name in variants:
        chain = bundle.variant(name)["chain"]
        tied = {other for p in positions for other, _ in bundle.blocks[chain[p]["block"]]["ties"].values()}
        for p, link in enumerate(chain):
            if p in positions or bundle.blocks[link["block"]]["name"] in tied:  # a tie loads the other block
                entries[link["block"]] = bundle.blocks[link["block"]]
            if p in positions and link["adapter"]:
                entries[link["adapter"]] = bundle.adapters[link["adapter"]]
    for entry in entries.values():
        if entry["file"]:
            verify_file(bundle.root / entry["file"], entry["sha256"])


class StageCopy:
    """The proxy's view of one copy: its actor (the actors of its ranks, rank 0 first, when it is tensor
    parallel), and a mirror of its KV pages kept in step with it (every rank holds the same pages, each
    for its own KV heads)."""

    def __init__(self, handle, label: str, ranks: tuple = ()):
        """`ranks`: the actors of ranks 1.. of a tensor-parallel copy (`handle` is rank 0's)."""
        self.handle, self.label = handle, label
        self.handles = [handle, *ranks]
        self.incarnation = ""
        self.incarnations: tuple[str, ...] = ()
        self._joining: Optional[tuple[list[dict], list]] = None
        """The ranks' attach answers and their group joins in flight (a tensor-parallel copy attaching)."""
        self.broken = True  # until attached
        self.num_layers = self.num_pages = self.free = 0
        self.page_size = 1
        self.held: dict[int, int] = {}
        """sequence -> pages it holds in each layer (every layer of the stage alike)."""
        self.ops: list[tuple] = []

    def attach(self, timeout_s: float) -> None:
        """Attach to every rank, or raise what `ray.get` raises. The ranks of a tensor-parallel copy also meet
        in a new process group: the join is started once and awaited at most `timeout_s` per call (a later
        call picks it up), so that no caller waits on it longer than it asked."""
        deadline = time.monotonic() + timeout_s

        def left() -> float:
            return max(deadline - time.monotonic(), 0.0)

        if self._joining is None:
            infos = ray.get([h.attach.remote() for h in self.handles], timeout=left())
            if len(self.handles) == 1:
                self.attached(*infos)
                return
            address = ray.get(self.handle.group_address.remote(), timeout=left())
            self._joining = (infos, [h.join_group.remote(*address) for h in self.handles])
        infos, joins = self._joining
        ready, _ = ray.wait(joins, num_returns=len(joins), timeout=left())
        try:
            ray.get(ready)  # a rank that could not join fails the attach at once; the next one starts over
        except Exception:
            self._joining = None
            raise
        if len(ready) < len(joins):
            raise GetTimeoutError(f"the ranks of stage actor {self.label} have not met yet")
        self._joining = None
        self.attached(*infos)

    def attached(self, info: dict, *ranks: dict) -> None:
        """The copy as its ranks describe themselves (`StageWorker.attach`; rank 0's figures, which every
        rank shares: the same pages, each for its own KV heads)."""
        if any((r["num_layers"], r["num_pages"], r["page_size"]) != (info["num_layers"], info["num_pages"],
                                                                     info["page_size"]) for r in ranks):
            raise RuntimeError(f"stage actor {self.label}: its ranks hold different KV caches ({info}, {ranks})")
        self.incarnations = (info["incarnation"], *(r["incarnation"] for r in ranks))
        self.incarnation, self.num_layers = info["incarnation"], info["num_layers"]
        self.num_pages, self.page_size = info["num_pages"], info["page_size"]
        self.free, self.held, self.ops, self.broken = self.num_pages, {}, [], False

    def extra(self, seq: int, num_tokens: int) -> int:
        need = math.ceil(num_tokens / self.page_size)
        return self.num_layers * max(0, need - self.held.get(seq, 0))

    def reserve(self, seq: int, num_tokens: int) -> bool:
        extra = self.extra(seq, num_tokens)
        if extra > self.free:
            return False
        if self.num_layers:
            self.held[seq] = max(self.held.get(seq, 0), math.ceil(num_tokens / self.page_size))
            self.free -= extra
            self.ops.append(("reserve", seq, num_tokens))
        return True

    def release(self, seq: int) -> None:
        if seq in self.held:
            self.free += self.num_layers * self.held.pop(seq)
            self.ops.append(("free", seq))


@dataclass
class StageTimings:
    """Where a remote stage's time goes, summed over steps (read by benchmarks/ray_overhead.py)."""

    calls: int = 0
    """Actor calls (one per copy in use per step)."""
    total_s: float = 0.0
    """run_calls wall time in the engine: split, pack, round trips, unpack."""
    remote_s: float = 0.0
    """Of which inside the actors (unpack, compute, pack), as they report it; the rest is transport + ours."""
    pack_s: float = 0.0
    """Of which packing inputs and unpacking outputs in the engine's process."""


class RemoteStage:
    """Engine-facing stage over actors: each sequence sticks to one copy of its variant's actors."""

    def __init__(self, positions: range, copies: dict[str, list[StageCopy]], call_timeout_s: float = 120.0,
                 attach_timeout_s: float = 0.5):
        """`copies`: variant -> the copies of the actor holding its blocks here."""
        self.positions = positions
        self.by_variant = copies
        self.all = list({id(c): c for cs in copies.values() for c in cs}.values())
        self.call_timeout_s, self.attach_timeout_s = call_timeout_s, attach_timeout_s
        self.seq_copy: dict[int, StageCopy] = {}
        self.cache = _PagesView(self) if any(c.num_layers for c in self.all) else None
        self.timings = StageTimings()

    # ------------------------------------------------------------------ KV (mirrored, no remote call)
    def can_reserve(self, seq: int, num_tokens: int, variant: Optional[str] = None) -> bool:
        copy = self._copy_for(seq, variant)
        return copy.extra(seq, num_tokens) <= copy.free

    def reserve(self, seq: int, num_tokens: int, variant: Optional[str] = None) -> bool:
        copy = self._copy_for(seq, variant)
        if not copy.reserve(seq, num_tokens):
            return False
        self.seq_copy[seq] = copy
        return True

    def free(self, seq: int) -> None:
        copy = self.seq_copy.pop(seq, None)
        if copy is not None and not copy.broken:  # a broken copy's mirror is reset when it is re-attached
            copy.release(seq)

    def extra_pages(self, seq: int, num_tokens: int) -> int:
        return self._copy_for(seq, None).extra(seq, num_tokens)

    def free_pages(self) -> int:
        return max(c.free for c in self.all)

    def capacity_tokens(self) -> int:
        return min(((c.num_pages // c.num_layers) * c.page_size if c.num_layers else 1 << 62) for c in self.all)

    def usage(self) -> float:
        return max((1 - c.free / c.num_pages if c.num_pages else 0.0) for c in self.all)

    def _copy_for(self, seq: int, variant: Optional[str]) -> StageCopy:
        if seq in self.seq_copy:
            return self.seq_copy[seq]
        candidates = self.by_variant[variant] if variant is not None else self.all
        usable = [c for c in candidates if not c.broken or self._reattach(c)]
        if not usable:
            raise StageFailed(f"stage actor {candidates[0].label} is not answering (restarting?)")
        return max(usable, key=lambda c: c.free)  # the copy with the most room: data parallelism per sequence

    def _reattach(self, copy: StageCopy) -> bool:
        try:
            copy.attach(self.attach_timeout_s)
        except RayError:  # not back yet (dead, restarting, timed out, or its ranks have not met)
            return False
        self.seq_copy = {s: c for s, c in self.seq_copy.items() if c is not copy}
        return True

    # ------------------------------------------------------------------ compute
    concurrent = True

    def run_calls(self, calls: list[BlockCall], inputs: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        return self.submit_calls(calls, inputs).result()

    def submit_calls(self, calls: list[BlockCall], inputs: dict[int, torch.Tensor]) -> "_RemoteCalls":
        """Split the step's calls by the copy each sequence sticks to and send one call per copy; the
        answer is awaited by `result()`, so the engine can meanwhile feed other stages."""
        start, t = time.perf_counter(), self.timings
        parts: dict[int, list[BlockCall]] = {}
        for call in calls:
            split: dict[int, list[Segment]] = {}
            for seg in call.segments:
                split.setdefault(id(self.seq_copy[seg.seq]), []).append(seg)
            for cid, segs in split.items():
                parts.setdefault(cid, []).append(BlockCall(call.position, call.key, _rebased(segs)))
        copies = {id(c): c for c in self.all}
        refs = []
        for cid, sub in parts.items():
            copy = copies[cid]
            if copy.broken:
                raise StageFailed(f"stage actor {copy.label} is restarting")
            seqs = {seg.seq for call in sub for seg in call.segments}
            ops, copy.ops = copy.ops, []
            packing = time.perf_counter()
            request = pickle.dumps((copy.incarnations, ops, sub, pack({s: inputs[s] for s in seqs})),
                                   protocol=pickle.HIGHEST_PROTOCOL)
            t.pack_s += time.perf_counter() - packing
            refs.append((copy, [h.run.remote(request) for h in copy.handles]))
        t.total_s += time.perf_counter() - start
        return _RemoteCalls(self, refs)

    def _get(self, copy: StageCopy, refs: list):
        """Rank 0's reply to one call of a copy; every rank's is awaited, within one deadline. A rank that
        died, restarted or did not answer fails the copy (`StageFailed`; its sequences are recomputed once
        it is back). On a tensor-parallel copy the others' collectives then fail too (`GroupBroken`), and
        the copy forms its group again when it is re-attached; an error of the code itself is raised as it is
        (and still breaks the copy's group)."""
        deadline = time.monotonic() + self.call_timeout_s
        replies, lost, broken, pending = {}, [], [], list(refs)
        while pending:  # as they finish: a code error is raised at once, not after the others' collectives time out
            done, pending = ray.wait(pending, num_returns=1, timeout=max(deadline - time.monotonic(), 0.0))
            if not done:
                lost.append("did not answer within the call timeout")
                break
            try:
                replies[done[0]] = ray.get(done[0])
            except RayTaskError as exc:
                if isinstance(exc.cause, StageRestarted):
                    lost.append("was restarted by Ray")
                elif isinstance(exc.cause, GroupBroken):
                    broken.append(str(exc.cause))
                else:
                    if len(refs) > 1:
                        copy.broken = True  # the other ranks' collectives are left waiting: the group must re-form
                    raise RuntimeError(f"stage actor {copy.label}: {exc.cause!r}") from None
            except RayError as exc:  # the actor died, or the reply was lost with its owner
                lost.append(f"failed ({type(exc).__name__})")
        if not (lost or broken):
            return replies[refs[0]]
        copy.broken = True
        raise StageFailed(f"stage actor {copy.label} {(lost or broken)[0]}") from None


class _RemoteCalls:
    """The actor calls of one `submit_calls`, in flight until `result()` collects them."""

    def __init__(self, stage: RemoteStage, refs: list):
        self.stage, self.refs = stage, refs

    def result(self) -> dict[int, torch.Tensor]:
        start, t = time.perf_counter(), self.stage.timings
        out: dict[int, torch.Tensor] = {}
        for copy, ref in self.refs:
            reply = self.stage._get(copy, ref)
            unpacking = time.perf_counter()
            packed, remote_s = pickle.loads(reply)
            out.update(unpack(packed))
            t.pack_s += time.perf_counter() - unpacking
            t.remote_s += remote_s
        t.calls += len(self.refs)
        t.total_s += time.perf_counter() - start
        return out


def _rebased(segments: list[Segment]) -> list[Segment]:
    out, start = [], 0
    for s in segments:
        out.append(Segment(s.seq, start, s.length, s.position, s.adapter))
        start += s.length
    return out


class _PagesView:
    """What the engine reads of a stage's cache (page totals for metrics) when the cache is remote."""

    def __init__(self, stage: RemoteStage):
        self._stage = stage

    @property
    def num_pages(self) -> int:
        return sum(c.num_pages for c in self._stage.all)

    @property
    def num_free(self) -> int:
        return sum(c.free for c in self._stage.all)


def wait_attached(copies: list[StageCopy], timeout_s: float, describe) -> None:
    """Attach to every actor, or fail with what could not be placed (`describe(label)` says what it needs)."""
    deadline = time.monotonic() + timeout_s
    loading = {c.label: (c, [h.info.remote() for h in c.handles]) for c in copies}  # every actor loads at once
    for label, (copy, loaded) in loading.items():
        try:
            ray.get(loaded, timeout=max(0.1, deadline - time.monotonic()))
            copy.attach(max(0.1, deadline - time.monotonic()))
        except GetTimeoutError:
            raise StageFailed(f"stage actor {label} did not start within {timeout_s:.0f} s; it needs "
                              f"{describe(label)} (cluster has {ray.available_resources()})") from None
        except RayActorError as exc:  # its constructor raised: Ray's message ends with the error's own line
            last = next((line for line in reversed(str(exc).splitlines()) if line.strip()), type(exc).__name__)
            raise StageFailed(f"stage actor {label} could not start: {last.split(': ', 1)[-1]}") from None
