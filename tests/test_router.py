"""One engine per node: the router follows the plan's routes exactly, and `RoutedEngines` serves every
request on its node's engine (real engines over the tiny bundle) with the one engine's greedy tokens."""
from __future__ import annotations

import random
import threading

import pytest

from planc.bundle import Bundle
from planc.runtime.engine import Engine, EngineConfig, StepStats
from planc.runtime.router import NodeRouter, RoutedEngines
from planc.runtime.sampling import SamplingParams


@pytest.mark.parametrize("seed", range(5))
def test_every_prefix_of_a_variants_requests_is_split_as_the_routes_say(seed):
    rng = random.Random(seed)
    weights = [rng.random() for _ in range(rng.randint(1, 4))]
    routes = {"v": {str(k): w / sum(weights) for k, w in enumerate(weights)}}
    router = NodeRouter(routes)
    counts = [0] * len(weights)
    for n in range(1, 301):
        counts[router.pick("v")] += 1
        for k, w in enumerate(weights):  # smooth weighted round robin never strays a request from its part
            assert abs(counts[k] - n * w / sum(weights)) < 1.0 + 1e-9


def test_a_variant_without_routes_is_not_served_and_unknown_nodes_are_refused(tiny_bundle):
    router = NodeRouter({"a": {"0": 1.0, "1": 0.0}})
    assert router.serves("a") and not router.serves("b") and router.nodes == [0]
    engine = Engine(Bundle.open(tiny_bundle), EngineConfig())
    with pytest.raises(ValueError, match=r"nodes \[3\]"):
        RoutedEngines({0: engine}, {"a": {"3": 1.0}})


PROMPTS = {"base": [1, 17, 33, 9], "legal": [1, 200, 5], "support": [1, 8, 8, 8, 40], "chat": [1, 99, 3]}
ROUTES = {"base": {"0": 1.0}, "chat": {"0": 0.5, "1": 0.5}, "legal": {"1": 1.0}, "support": {"1": 1.0}}


def _serve(engine, requests: list[tuple[str, list[int]]], abort: set[int] = frozenset()) -> list[tuple[list, str]]:
    """Submit every request, run the engine(s) in threads until all have finished; (tokens, reason) each."""
    out: list = [([], None) for _ in requests]
    done = threading.Semaphore(0)
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    stop = threading.Event()
    ids = []
    for i, (variant, prompt) in enumerate(requests):
        def sink(event, i=i):
            if event.token_id is not None:
                out[i][0].append(event.token_id)
            if event.finished:
                out[i] = (out[i][0], event.finish_reason)
                done.release()
        ids.append(engine.submit(variant, prompt, params, sink))
    for i in abort:
        engine.abort(ids[i])
    thread = threading.Thread(target=engine.run, args=(stop,), daemon=True)
    thread.start()
    for _ in requests:
        assert done.acquire(timeout=120), "a request never finished"
    stop.set()
    thread.join(10)
    assert not thread.is_alive()
    return out


def test_each_request_runs_on_its_nodes_engine_with_the_one_engines_tokens(tiny_bundle):
    bundle = Bundle.open(tiny_bundle)
    requests = [(v, p) for _ in range(2) for v, p in PROMPTS.items()]
    alone = _serve(Engine(bundle, EngineConfig()), requests)
    seen: dict[int, set[str]] = {0: set(), 1: set()}
    engines = {k: Engine(bundle, EngineConfig(), StepStats(on_batch=lambda key, n, nv, k=k: seen[k].add(key)))
               for k in (0, 1)}
    routed = RoutedEngines(engines, ROUTES)
    assert _serve(routed, requests) == alone
    assert all(reason == "length" for _, reason in alone)
    chains = {v: {link["block"] for link in bundle.variants[v]["chain"]} for v in PROMPTS}
    # node 0 ran base and half of chat; node 1 legal, support and the other half of chat
    assert seen[0] <= chains["base"] | chains["chat"] and seen[0] & (chains["base"] - chains["legal"])
    assert seen[1] <= chains["legal"] | chains["support"] | chains["chat"]
    assert seen[1] & (chains["support"] - chains["base"]) and seen[1] & (chains["legal"] - chains["base"])
    assert routed.num_waiting == 0 and routed.running == [] and routed._where == {}


def test_an_abort_reaches_the_engine_that_holds_the_request(tiny_bundle):
    bundle = Bundle.open(tiny_bundle)
    routed = RoutedEngines({k: Engine(bundle, EngineConfig()) for k in (0, 1)}, ROUTES)
    out = _serve(routed, [("legal", PROMPTS["legal"]), ("base", PROMPTS["base"])], abort={0})
    assert out[0][1] == "abort" and out[1][1] == "length" and len(out[1][0]) == 10
