"""Concurrent stages are pipelined: while one lane of sequences is in a later stage, the next lane
runs in an earlier one. Outputs stay those of one in-process stage, also through aborts and a tight
KV cache. Stages on worker threads stand in for the processes (Ray actors) they are in production:
each runs its calls one at a time, in the order sent, as an actor does."""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

import planc
from planc.runtime.engine import Engine, EngineConfig
from planc.runtime.sampling import SamplingParams
from planc.runtime.stage import local_stages

PROMPTS = [("base", [1, 17, 33, 9]), ("legal", [1, 200, 5]), ("chat", [1, 8, 8, 8, 40]), ("support", [1, 99]),
           ("base", [1, 5, 6, 7, 8, 9, 10]), ("legal", [1, 42]), ("chat", [1, 3]), ("support", [1, 60, 61])]
PARAMS = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)


class ThreadedStage:
    """A stage computing on its own thread: `submit_calls` returns at once, `result()` waits."""

    concurrent = True

    def __init__(self, stage, busy: list[int], log: list[int]):
        self.stage, self.busy, self.log = stage, busy, log
        self.pool = ThreadPoolExecutor(max_workers=1)
        self.lock = threading.Lock()

    def __getattr__(self, name):  # KV bookkeeping and everything else: the wrapped stage's
        return getattr(self.stage, name)

    def submit_calls(self, calls, inputs):
        with self.lock:
            self.busy[0] += 1
            self.log.append(self.busy[0])  # stages with work outstanding, this one included
        future = self.pool.submit(self.stage.run_calls, calls, inputs)
        stage = self

        class Pending:
            def result(self):
                out = future.result()
                with stage.lock:
                    stage.busy[0] -= 1
                return out
        return Pending()


def _run(engine: Engine, abort_after: int | None = None) -> list[list[int]]:
    outputs: list[list[int]] = [[] for _ in PROMPTS]
    ids = []
    for i, (variant, prompt) in enumerate(PROMPTS):
        def sink(event, i=i):
            if event.token_id is not None:
                outputs[i].append(event.token_id)
        ids.append(engine.submit(variant, prompt, PARAMS, sink))
    steps = 0
    while engine.has_work():
        engine.step()
        steps += 1
        if steps == abort_after:
            engine.abort(ids[1])
        assert steps < 5000
    return outputs


@pytest.fixture(scope="module")
def bundle(tiny_bundle):
    return planc.Bundle.open(tiny_bundle)


def _pipelined(bundle, config, num_stages=3):
    busy, log = [0], []
    stages = [ThreadedStage(s, busy, log) for s in local_stages(bundle, config.kv_cache_bytes, config.page_size,
                                                                 num_stages=num_stages)]
    return Engine(bundle, config, stages=stages), log


@pytest.mark.parametrize("kv_bytes", [2**20, 96 * 1024], ids=["roomy", "tight"])
def test_pipelined_stages_give_the_tokens_of_one_stage_and_overlap(bundle, kv_bytes):
    config = EngineConfig(kv_cache_bytes=kv_bytes, page_size=4)
    want = _run(Engine(bundle, EngineConfig(kv_cache_bytes=2**20, page_size=4)))
    engine, log = _pipelined(bundle, config)
    assert engine.pipelined
    assert _run(engine) == want
    assert max(log) >= 2  # a lane was sent into a stage while another stage still had one
    assert engine.kv_free_pages() == engine.kv_pages()
    assert (engine.stats.preemptions > 0) == (kv_bytes < 2**20)


def test_an_abort_in_flight_leaves_the_other_lanes_exact(bundle):
    config = EngineConfig(kv_cache_bytes=2**20, page_size=4)
    want = _run(Engine(bundle, config))
    engine, _ = _pipelined(bundle, config)
    got = _run(engine, abort_after=4)
    assert [o for i, o in enumerate(got) if i != 1] == [o for i, o in enumerate(want) if i != 1]
    assert len(got[1]) < PARAMS.max_tokens and got[1] == want[1][:len(got[1])]
    assert engine.kv_free_pages() == engine.kv_pages() and not engine._in_flight and not engine._free_later
