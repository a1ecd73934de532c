"""Which node's engine serves a request, on a plan that runs one engine per node.

The plan routes each variant's traffic over the nodes that hold its whole chain (`Plan.routes`: the
part of the variant's requests each node's engine serves). The router follows those parts exactly
and deterministically: smooth weighted round robin per variant (the next request goes to the node
furthest behind its part), so every window of requests of a variant is split as the plan says, and
the simulator (`planc.plan_sim`) sends the same requests to the same nodes as `planc serve` does.

>>> router = NodeRouter({"a": {"0": 0.75, "1": 0.25}, "b": {"1": 1.0}})
>>> [router.pick("a") for _ in range(8)]
[0, 0, 1, 0, 0, 0, 1, 0]
>>> router.pick("b"), router.nodes
(1, [0, 1])
"""
from __future__ import annotations

import itertools
import threading
from types import SimpleNamespace
from typing import Callable, Mapping


class NodeRouter:
    """Per variant, the node whose engine takes its next request (smooth weighted round robin)."""

    def __init__(self, routes: Mapping[str, Mapping[str, float]]):
        self.weights = {v: {int(k): float(w) for k, w in r.items() if w > 0} for v, r in routes.items()}
        self.weights = {v: w for v, w in self.weights.items() if w}
        self.nodes = sorted({k for w in self.weights.values() for k in w})
        self._credit = {v: {k: 0.0 for k in w} for v, w in self.weights.items()}

    def serves(self, variant: str) -> bool:
        return variant in self.weights

    def pick(self, variant: str) -> int:
        """The node for the variant's next request (KeyError for a variant no node serves)."""
        weights, credit = self.weights[variant], self._credit[variant]
        total = sum(weights.values())
        for k, w in weights.items():
            credit[k] += w
        node = max(credit, key=lambda k: (credit[k], -k))
        credit[node] -= total
        return node


class RoutedEngines:
    """One engine per node behind one server: a request goes to the engine of the node the router picks
    for its variant, and stays there. It reads as one `planc.runtime.engine.Engine` to the server (the
    same calls; sequence ids are its own, mapped to the engine's)."""

    def __init__(self, engines: Mapping[int, "Engine"], routes: Mapping[str, Mapping[str, float]]):  # noqa: F821
        self.engines = dict(engines)
        self.router = NodeRouter(routes)
        unknown = sorted(set(self.router.nodes) - set(self.engines))
        if unknown:
            raise ValueError(f"the routes name nodes {unknown} that have no engine ({sorted(self.engines)})")
        first = next(iter(self.engines.values()))
        self.config, self.bundle = first.config, first.bundle
        self._ids = itertools.count()
        self._where: dict[int, tuple[object, int]] = {}
        self._lock = threading.Lock()

    @property
    def stats(self):
        return SimpleNamespace(preemptions=sum(e.stats.preemptions for e in self.engines.values()))

    @property
    def num_unique_blocks(self) -> int:
        return len({key for e in self.engines.values() for chain in e.chains.values() for key, _ in chain})

    @property
    def running(self) -> list:
        return [s for e in self.engines.values() for s in e.running]

    @property
    def num_waiting(self) -> int:
        return sum(e.num_waiting for e in self.engines.values())

    def kv_usage(self) -> float:
        return max(e.kv_usage() for e in self.engines.values())

    def kv_pages(self) -> int:
        return sum(e.kv_pages() for e in self.engines.values())

    def max_tokens_capacity(self) -> int:
        return min(e.max_tokens_capacity() for e in self.engines.values())

    def submit(self, variant: str, prompt_ids: list[int], params, sink: Callable) -> int:
        """Queue a request on its node's engine (QueueFull from that engine when its queue is full)."""
        with self._lock:
            node = self.router.pick(variant) if self.router.serves(variant) else min(self.engines)
            seq_id = next(self._ids)
        engine = self.engines[node]
        done = threading.Event()

        def forward(event) -> None:
            if event.finished:
                done.set()
                self._where.pop(seq_id, None)
            sink(event)

        self._where[seq_id] = (engine, engine.submit(variant, prompt_ids, params, forward))
        if done.is_set():  # it ended before its id was recorded
            self._where.pop(seq_id, None)
        return seq_id

    def abort(self, seq_id: int) -> None:
        engine, own = self._where.get(seq_id, (None, -1))
        if engine is not None and own >= 0:
            engine.abort(own)

    def run(self, stop: threading.Event) -> None:
        """Every engine's loop in a thread of its own, until `stop`."""
        threads = [threading.Thread(target=e.run, args=(stop,), name=f"planc-engine-node{k}", daemon=True)
                   for k, e in self.engines.items()]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
