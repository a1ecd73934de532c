"""A stage in another process can die and take its KV with it (StageFailed): the engine recomputes the
running sequences once the stage answers again (outputs unchanged), and fails them with `unavailable`
(HTTP 503) when it stays down past the timeout. In-process stages stand in for the remote ones here."""
from __future__ import annotations

import threading
import time

import planc
from planc.runtime.engine import Engine, EngineConfig
from planc.runtime.sampling import SamplingParams
from planc.runtime.stage import StageFailed, local_stages

PROMPTS = [("base", [1, 17, 33, 9]), ("legal", [1, 200, 5]), ("chat", [1, 8, 8, 8, 40]), ("support", [1, 99])]
PARAMS = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


def _engine(bundle, timeout_s: float = 30.0) -> Engine:
    config = EngineConfig(kv_cache_bytes=2**20, page_size=4, stage_timeout_s=timeout_s)
    return Engine(bundle, config, stages=local_stages(bundle, config.kv_cache_bytes, config.page_size, num_stages=2))


def _serve(engine: Engine, deadline_s: float = 60.0) -> list[tuple[list[int], str]]:
    """Run every prompt through the engine's own thread; (tokens, finish reason) of each."""
    results = [([], None) for _ in PROMPTS]
    done = threading.Event()

    def sink(i, event):
        if event.token_id is not None:
            results[i][0].append(event.token_id)
        if event.finished:
            results[i] = (results[i][0], event.finish_reason)
            if all(r[1] for r in results):
                done.set()

    stop = threading.Event()
    thread = threading.Thread(target=engine.run, args=(stop,), daemon=True)
    thread.start()
    for i, (variant, prompt) in enumerate(PROMPTS):
        engine.submit(variant, prompt, PARAMS, lambda event, i=i: sink(i, event))
    assert done.wait(deadline_s), "a sequence hung"
    stop.set()
    thread.join(5)
    return results


def _failing(stage, fail) -> None:
    """Make `stage.run_calls` raise StageFailed whenever `fail()` says so (the process died meanwhile)."""
    original = stage.run_calls

    def run_calls(calls, inputs):
        if fail():
            raise StageFailed("stage test is restarting")
        return original(calls, inputs)

    stage.run_calls = run_calls


def test_a_stage_that_comes_back_costs_a_recompute_not_a_request(tiny_bundle):
    bundle = planc.Bundle.open(tiny_bundle)
    expected = _serve(_engine(bundle))
    engine = _engine(bundle)
    calls = {"n": 0}

    def fail() -> bool:  # down for three attempts after a few steps, then back
        calls["n"] += 1
        return 4 <= calls["n"] < 7

    _failing(engine.stages[1], fail)
    assert _serve(engine) == expected
    assert engine.stats.preemptions >= len(PROMPTS)  # every running sequence was recomputed
    assert engine.kv_free_pages() == engine.kv_pages()


def test_a_stage_that_stays_down_fails_its_requests_as_unavailable(tiny_bundle):
    bundle = planc.Bundle.open(tiny_bundle)
    engine = _engine(bundle, timeout_s=0.5)
    calls = {"n": 0}

    def fail() -> bool:
        calls["n"] += 1
        return calls["n"] >= 2

    _failing(engine.stages[1], fail)
    start = time.monotonic()
    results = _serve(engine, deadline_s=10)
    assert {reason for _, reason in results} == {"unavailable"}
    assert time.monotonic() - start < 5
    assert engine.kv_free_pages() == engine.kv_pages() and not engine.running and not engine.waiting
