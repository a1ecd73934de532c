"""Concurrent stages are pipelined: while one lane of sequences is in a later stage, the next lane
runs in an earlier one. Outputs stay those of one in-process stage, also through aborts and a tight
KV cache. Stages on worker threads stand in for the processes (Ray actors) they are in production:
each runs its calls one at a time, in the order sent, as an actor does. The number of lanes is a
policy (EngineConfig.lanes; a bundle's plan records the planner's choice): it changes what is in
flight at once, never the tokens."""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

import planc
from planc.runtime.engine import Engine, EngineConfig, plan_lanes
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


@pytest.mark.parametrize("kv_bytes", [2**20, 96 * 1024], ids=["roomy", "tight"])
def test_one_lane_or_two_through_two_stages_give_the_same_tokens(bundle, kv_bytes):
    """Two concurrent stages: one lane keeps one stage busy at a time (the whole batch walks the stages),
    two lanes overlap them; greedy tokens are those of one in-process stage either way."""
    want = _run(Engine(bundle, EngineConfig(kv_cache_bytes=2**20, page_size=4)))
    for lanes, most_busy in ((1, 1), (2, 2)):
        engine, log = _pipelined(bundle, EngineConfig(kv_cache_bytes=kv_bytes, page_size=4, lanes=lanes), 2)
        assert engine.pipelined and engine.num_lanes == lanes
        assert _run(engine) == want, lanes
        assert max(log) == most_busy  # stages with work outstanding at once
        assert engine.kv_free_pages() == engine.kv_pages() and not engine._in_flight


def test_lanes_default_to_one_per_stage_and_never_exceed_the_stages(bundle):
    config = EngineConfig(kv_cache_bytes=2**20, page_size=4)
    assert _pipelined(bundle, config)[0].num_lanes == 3
    engine, log = _pipelined(bundle, EngineConfig(kv_cache_bytes=2**20, page_size=4, lanes=8), 2)
    assert engine.num_lanes == 2
    assert _run(engine) == _run(Engine(bundle, config))
    with pytest.raises(ValueError, match="lanes must be at least 1"):
        EngineConfig(lanes=0)


def _plan_with(*pps_per_group):
    from types import SimpleNamespace

    return SimpleNamespace(groups=[{"layouts": [{"pp": pp} for pp in pps]} for pps in pps_per_group])


def test_a_plan_gets_its_deepest_pipeline_in_lanes():
    assert plan_lanes(_plan_with([1], [1, 1]), 2) == 1  # a trunk and tops, no pipeline: one lane
    assert plan_lanes(_plan_with([2, 4], [1], [3]), 8) == 4  # any group's layout, not only its busiest
    assert plan_lanes(_plan_with([4]), 3) == 3  # at most one per stage
    assert plan_lanes(_plan_with([], []), 2) == 1


@pytest.fixture(scope="module")
def planned(tiny_example, tmp_path_factory):
    """The tiny example compiled with a plan for two H100s."""
    from planc.pass_manager import PassContext

    ctx = PassContext()
    ctx.options["cost"] = {"cluster": "2xH100-80GB"}
    out = tmp_path_factory.mktemp("planned") / "tiny"
    return planc.Bundle.open(planc.emit(planc.compile(planc.load(tiny_example), ctx=ctx), out=out))


def test_planc_serve_takes_the_lanes_from_the_plan_unless_told(tiny_bundle, planned):
    from planc.runtime.server import ServeOptions, engine_config

    assert engine_config(planc.Bundle.open(tiny_bundle), ServeOptions()).lanes is None  # no plan: one per stage
    config = engine_config(planned, ServeOptions())
    assert len(config.stage_positions) >= 2 and config.lanes == planned.plan.settings["lanes"] >= 1
    assert engine_config(planned, ServeOptions(lanes=2)).lanes == 2
    # a plan written before plans recorded their lanes: its deepest pipeline
    chosen = planned.plan.settings.pop("lanes")
    try:
        depth = max(lay["pp"] for g in planned.plan.groups for lay in g["layouts"])
        assert engine_config(planned, ServeOptions()).lanes == min(depth, len(config.stage_positions))
    finally:
        planned.plan.settings["lanes"] = chosen  # the fixture is shared by the module's tests


def test_the_ray_ingress_gets_the_lanes_planc_serve_was_given(planned):
    """The ingress rebuilds ServeOptions from the dict `planc serve` deploys with (ray_launch.deploy)."""
    from dataclasses import asdict

    from planc.runtime.server import ServeOptions, engine_config

    pytest.importorskip("ray")
    from planc.backends.ray_app import serve_options

    assert serve_options({**asdict(ServeOptions(lanes=2)), "shutdown_timeout_s": 5.0}).lanes == 2
    assert engine_config(planned, serve_options(asdict(ServeOptions(lanes=2)))).lanes == 2
