"""Simulating a plan as the runtime serves it: one engine whose lanes walk the stages, each stage's
calls on the devices of the group copies that serve them, time-sliced where copies share a device.

The device clock is checked against hand-computed end times; the co-simulation of several engines
against independent runs (no shared device: the same records); plans against hand-computed token
times (one lane, as planc serve runs a plan without a pipeline, and two lanes, through a trunk stage
and per-variant top stages, with and without a top on the trunk's device; copies of a group serving
sequences side by side); a plan against itself with its two block groups moved onto one device
(about half the capacity); the stages, copies and lanes against the ray backend's layout of the
same plan."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from planc.cluster import load_device
from planc.cost import BlockCost, CostModel
from planc.plan import Plan, StagePlacement
from planc.runtime.engine import EngineConfig
from planc.sim_devices import DeviceClock
from planc.sim_model import SimModel
from planc.simulate import EngineRun, simulate, simulate_engines
from planc.workload import Fixed, GammaWorkload, Request

LLAMA70B = {"model_type": "llama", "vocab_size": 128256, "hidden_size": 8192, "intermediate_size": 28672,
            "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8, "rms_norm_eps": 1e-5,
            "rope_theta": 500000.0, "torch_dtype": "bfloat16", "max_position_embeddings": 8192}


def _ends(clock: DeviceClock) -> list[tuple[str, float]]:
    out = []
    while (t := clock.next_end()) != float("inf"):
        out += [(k, t) for k in clock.pop_ended(t)]
    return out


def test_steps_on_one_device_share_its_time():
    clock = DeviceClock({"a": {0: 1.0}, "b": {0: 1.0}})
    clock.start("a", 0.0, 1.0)
    clock.start("b", 0.5, 1.5)  # a has 0.5 s left; both now run at half speed
    assert _ends(clock) == [("a", pytest.approx(1.5)), ("b", pytest.approx(2.0))]


def test_a_keys_next_step_does_not_end_at_a_stale_entry_of_its_last():
    """a is slowed by b, then sped up again when b ends: its slowed end stays in the heap, stale. a's next
    step, slowed once by b's next step, must end when its own work is done (3.5), not at that entry (2.0)."""
    clock = DeviceClock({"a": {0: 1.0}, "b": {0: 1.0}})
    clock.start("a", 0.0, 1.0)
    clock.start("b", 0.0, 0.5)
    assert clock.next_end() == pytest.approx(1.0) and clock.pop_ended(1.0) == ["b"]
    assert clock.next_end() == pytest.approx(1.5) and clock.pop_ended(1.5) == ["a"]
    clock.start("a", 1.5, 2.5)  # at once, as an engine starts its next step
    clock.start("b", 1.5, 2.5)
    assert _ends(clock) == [("a", pytest.approx(3.5)), ("b", pytest.approx(3.5))]


def test_pipeline_lanes_fill_their_devices_without_slowing():
    lanes = {f"lane{i}": {0: 0.25, 1: 0.25, 2: 0.25, 3: 0.25} for i in range(4)}
    clock = DeviceClock(lanes)
    for i in range(4):
        clock.start(f"lane{i}", 0.0, 1.0 + i)
    assert _ends(clock) == [("lane0", 1.0), ("lane1", 2.0), ("lane2", 3.0), ("lane3", 4.0)]
    clock = DeviceClock({**lanes, "top": {3: 1.0}})  # another group's stage on device 3: all five share it
    for k in [*lanes, "top"]:
        clock.start(k, 0.0, 1.0)
    assert _ends(clock) == [(k, pytest.approx(2.0)) for k in [*lanes, "top"]]


def test_fair_rates_give_a_device_left_over_by_a_step_slowed_elsewhere():
    """a is slowed to 1/3 by device 1 (three steps); on device 0 b gets the 2/3 that a leaves."""
    clock = DeviceClock({"a": {0: 1.0, 1: 1.0}, "b": {0: 1.0}, "c": {1: 1.0}, "d": {1: 1.0}, "own": {}})
    for k in "abcd":
        clock.start(k, 0.0, 1.0)
    clock.start("own", 0.0, 1.0)
    assert clock.steps["a"].rate == pytest.approx(1 / 3) and clock.steps["b"].rate == pytest.approx(2 / 3)
    assert clock.steps["own"].rate == 1.0
    assert _ends(clock)[0] == ("own", 1.0)


def _engine_runs(devices_a, devices_b):
    layer = BlockCost("layer", linear_flops_per_token=2e9, attn_flops_per_pair=5120, kv_bytes_per_token=4096.0,
                      weight_bytes=2e9)
    model = SimModel.from_data({"a": [("L", None), ("L2", None)]}, {"L": layer, "L2": layer})
    cfg = EngineConfig(kv_cache_bytes=int(4096 * 2 * 200 * 64), max_running=32, block_batch_cap=32,
                       max_batch_tokens=512)
    reqs = GammaWorkload(rate=1e5, cv=1.0, num_requests=300, seed=1, variants={"a": 1},  # all at once
                         prompt_tokens=Fixed(value=100), output_tokens=Fixed(value=32)).requests(["a"])
    return [EngineRun(model, reqs, cfg, 2, devices_a), EngineRun(model, reqs, cfg, 2, devices_b)], model, cfg, reqs


def test_engines_on_devices_of_their_own_step_as_they_would_alone():
    cm = CostModel(load_device("H100-80GB"), 2)
    runs, model, cfg, reqs = _engine_runs([{0: 1.0}, {1: 1.0}], [{2: 1.0}, {3: 1.0}])
    alone = simulate(model, cm, reqs, cfg, 2)
    for result in simulate_engines(runs, cm):
        assert [dataclasses.astuple(r) for r in result.requests] == [dataclasses.astuple(r) for r in alone.requests]
        assert result.replicas == alone.replicas
    # the same engines on the same two devices: every step shares its device with the other engine's
    shared = simulate_engines(_engine_runs([{0: 1.0}, {1: 1.0}], [{0: 1.0}, {1: 1.0}])[0], cm)
    makespan = alone.makespan_s - reqs[0].arrival_s
    assert shared[0].makespan_s - reqs[0].arrival_s == pytest.approx(2 * makespan, rel=0.1)  # saturated
    assert shared[0].replicas == shared[1].replicas  # symmetric
    with pytest.raises(ValueError, match="devices are given for 1 replicas; the engine has 2"):
        simulate_engines([dataclasses.replace(runs[0], devices=[{0: 1.0}])], cm)


def _spec(root, changes: str):
    (root / "base").mkdir()
    (root / "base" / "config.json").write_text(json.dumps(LLAMA70B))
    (root / "w.yaml").write_text("kind: gamma\nrate: 10\nnum_requests: 200\nvariants: {base: 1, ft0: 1}\n"
                                 "prompt_tokens: {dist: fixed, value: 256}\noutput_tokens: {dist: fixed, value: 64}\n")
    (root / "model.yaml").write_text(
        f"base: {{name: base, path: ./base}}\nvariants:\n  - {{name: ft0, changes: [{changes}]}}\n"
        "plan: {cluster: 8xH100-80GB, time_limit_s: 2, workload: w.yaml, slo: {tpot_ms: 100, ttft_ms: 2000}}\n")
    return root / "model.yaml"


@pytest.fixture(scope="module")
def two_group_program(tmp_path_factory):
    """base and a variant that changes every block: two block groups, half the traffic each."""
    from planc.planner import plan

    program = plan(_spec(tmp_path_factory.mktemp("plan_sim"), "embedding, layers.0-79, head"))
    assert [g["users"] for g in program.plan.groups] == [["base"], ["ft0"]]
    return program


@pytest.fixture(scope="module")
def trunk_program(tmp_path_factory):
    """base and a variant that changes the top 8 layers and the head: a shared trunk and two tops."""
    from planc.planner import plan

    program = plan(_spec(tmp_path_factory.mktemp("plan_sim"), "layers.72-79, head"))
    assert [g["users"] for g in program.plan.groups] == [["base", "ft0"], ["base"], ["ft0"]]
    return program


def _names(program) -> list[str]:
    return list(program.extras["plan_inputs"]["costs"])


def _placed(program, copies: dict[str, list[tuple[int, ...]]], batch: int = 64) -> Plan:
    """The program's plan with every group laid out anew: group id -> the devices of each of its copies
    (single-stage, TP = number of devices, batch `batch`)."""
    names, groups, placements = _names(program), [], []
    for g in program.plan.groups:
        devices = copies[g["id"]]
        lay = {**g["layouts"][0], "pp": 1, "tp": len(devices[0]), "batch": batch, "replicas": len(devices),
               "stage_blocks": [g["num_blocks"]]}
        groups.append({**g, "layouts": [lay]})
        blocks = tuple(names[g["first_position"]:g["first_position"] + g["num_blocks"]])
        placements += [StagePlacement(g["id"], i, 0, blocks, devs, 0, len(devs), batch, 1.0, 1.0)
                       for i, devs in enumerate(devices)]
    # the planner's lane count was chosen for its own layouts: the new ones set their own (their deepest pipeline)
    settings = {k: v for k, v in program.plan.settings.items() if k not in ("lanes", "lanes_per_node")}
    return dataclasses.replace(program.plan, groups=groups, placements=placements, settings=settings)


def _prefill_s(program, cm: CostModel, positions: range, tp: int, prompt: int, num_seqs: int = 1) -> float:
    """`num_seqs` prompts in one batch through `positions` at TP `tp`, block by block (the head: one row
    each)."""
    costs, names, t = program.extras["plan_inputs"]["costs"], _names(program), 0.0
    for p in positions:
        cost = dataclasses.replace(costs[names[p]], tp=tp)
        if cost.kind == "head":
            t += cm.block_time(cost, decode_seqs=num_seqs, context_tokens=0.0, attn_pairs=0.0, num_seqs=num_seqs)
        else:
            t += cm.block_time(cost, prefill_tokens=prompt * num_seqs, attn_pairs=num_seqs * prompt * (prompt + 1) / 2,
                               num_seqs=num_seqs)
    return t


def _run(program, plan: Plan, requests: list[Request], cm: CostModel, lanes: int | None = None):
    """The plan simulated as planc serve runs it, or with `lanes` (planc serve --lanes)."""
    from planc.plan_sim import staged_run
    from planc.sim_stages import simulate_staged

    ov = cm.device.overheads  # the hand-computed times below leave out the runtime's fixed costs
    assert ov.step_us == ov.block_call_us == ov.per_seq_us == ov.server_token_us == ov.server_request_us == 0
    run = staged_run(program, plan, requests)
    if lanes is not None:
        run.config.lanes = lanes
    return simulate_staged(run, cm)


def test_a_plan_without_a_pipeline_runs_one_lane_through_the_trunk_and_the_tops(trunk_program):
    """No group is pipelined (pp 1): one lane, as planc serve runs it. Two requests at once: the trunk
    runs both prompts in one call, then each top its own on its own device at the same time; both
    first tokens come at once. A top on the trunk's device costs nothing: the lane is in one stage at
    a time."""
    program = trunk_program
    cm = CostModel.for_cluster(program.extras["plan_inputs"]["cluster"], 2)
    plan = _placed(program, {"g0": [(0, 1)], "g1": [(2,)], "g2": [(3,)]})
    from planc.plan_sim import staged_run

    run = staged_run(program, plan, [])
    assert len(run.stages) == 2 and run.config.lanes == 1
    both, top = _prefill_s(program, cm, range(0, 73), 2, 64, num_seqs=2), _prefill_s(program, cm, range(73, 82), 1, 64)
    requests = [Request(0.0, "base", 64, 4), Request(0.0, "ft0", 64, 4)]
    result = _run(program, plan, requests, cm)
    a, b = result.requests
    assert a.status == b.status == "ok" and a.num_tokens == b.num_tokens == 4
    assert a.first_token_s == b.first_token_s == pytest.approx(both + top, rel=1e-9)
    assert [calls for _, calls, _ in result.replicas] == [4, 4, 4]  # one trunk call per token for both
    shared = _run(program, _placed(program, {"g0": [(0, 1)], "g1": [(0,)], "g2": [(3,)]}), requests, cm).requests
    assert [dataclasses.astuple(r) for r in shared] == [dataclasses.astuple(r) for r in result.requests]


def test_lanes_walk_the_trunk_then_each_variants_top_once(trunk_program):
    """The same plan with two lanes (planc serve --lanes 2): two requests at once run as two lanes of
    one sequence each. Lane 1's trunk call, then lane 2's on the same copy; lane 1's top meanwhile;
    lane 1 samples once the engine has handed lane 2 on. One TTFT per request along the lanes, not a
    sum of per-group passes (which gave the trunk's time for both sequences batched, plus a top's, to
    both)."""
    program = trunk_program
    cm = CostModel.for_cluster(program.extras["plan_inputs"]["cluster"], 2)
    plan = _placed(program, {"g0": [(0, 1)], "g1": [(2,)], "g2": [(3,)]})
    assert plan.stage_ranges(82) == [range(0, 73), range(73, 82)]
    trunk, top = _prefill_s(program, cm, range(0, 73), 2, 64), _prefill_s(program, cm, range(73, 82), 1, 64)
    assert 0 < top < trunk
    result = _run(program, plan, [Request(0.0, "base", 64, 4), Request(0.0, "ft0", 64, 4)], cm, lanes=2)
    a, b = result.requests
    assert a.status == b.status == "ok" and a.num_tokens == b.num_tokens == 4
    assert a.first_token_s == pytest.approx(2 * trunk, rel=1e-9)
    assert b.first_token_s == pytest.approx(2 * trunk + top, rel=1e-9)
    assert [calls for _, calls, _ in result.replicas] == [8, 4, 4]  # the trunk copy runs both lanes' steps


def test_a_top_on_the_trunks_device_slows_the_trunk_steps_it_overlaps(trunk_program):
    """Two lanes, the same requests with base's top on device 0, which the trunk (devices 0-1) also runs on: lane 1's
    top and lane 2's trunk call share device 0 at half speed each; the top ends after 2 x its time,
    lane 2's trunk call `top` later than alone, and every token after it waits for that."""
    program = trunk_program
    cm = CostModel.for_cluster(program.extras["plan_inputs"]["cluster"], 2)
    plan = _placed(program, {"g0": [(0, 1)], "g1": [(0,)], "g2": [(3,)]})
    trunk, top = _prefill_s(program, cm, range(0, 73), 2, 64), _prefill_s(program, cm, range(73, 82), 1, 64)
    a, b = _run(program, plan, [Request(0.0, "base", 64, 4), Request(0.0, "ft0", 64, 4)], cm, lanes=2).requests
    assert a.first_token_s == pytest.approx(2 * trunk + top, rel=1e-9)
    assert b.first_token_s == pytest.approx(2 * trunk + 2 * top, rel=1e-9)
    apart = _run(program, _placed(program, {"g0": [(0, 1)], "g1": [(2,)], "g2": [(3,)]}),
                 [Request(0.0, "base", 64, 4), Request(0.0, "ft0", 64, 4)], cm, lanes=2).requests
    assert a.last_token_s > apart[0].last_token_s and b.last_token_s > apart[1].last_token_s


def test_copies_of_a_group_serve_sequences_side_by_side(two_group_program):
    """One stage; base's group has two copies: two base requests go one to each copy (the one with the
    most free KV) and both take one sequence's time; with one copy they share a batched call."""
    program = two_group_program
    cm = CostModel.for_cluster(program.extras["plan_inputs"]["cluster"], 2)
    alone = _prefill_s(program, cm, range(82), 2, 512)
    two = _placed(program, {"g0": [(0, 1), (2, 3)], "g1": [(4, 5)]})
    result = _run(program, two, [Request(0.0, "base", 512, 3), Request(0.0, "base", 512, 3)], cm)
    assert [r.first_token_s for r in result.requests] == [pytest.approx(alone, rel=1e-9)] * 2
    assert [calls for _, calls, _ in result.replicas] == [3, 3, 0]
    one = _run(program, _placed(program, {"g0": [(0, 1)], "g1": [(4, 5)]}),
               [Request(0.0, "base", 512, 3), Request(0.0, "base", 512, 3)], cm)
    assert one.requests[0].first_token_s > alone * 1.5  # 1024 prompt tokens in one call: compute-bound
    assert [calls for _, calls, _ in one.replicas] == [3, 0]


def test_two_groups_on_one_device_reach_about_half_the_capacity(two_group_program):
    from planc.plan_sim import head_to_head, simulated_capacity

    program = two_group_program
    cm = CostModel.for_cluster(program.extras["plan_inputs"]["cluster"], 2)
    apart = _placed(program, {"g0": [(0, 1)], "g1": [(2, 3)]})
    together = _placed(program, {"g0": [(0, 1)], "g1": [(0, 1)]})

    def capacity(p):
        return simulated_capacity(program, p, cm, num_requests=200, steps=5, max_requests=1500)

    alone, shared = capacity(apart), capacity(together)
    assert alone > 0 and 0.35 < shared / alone < 0.65
    # the same trials, deployment against deployment: each meets the SLO at its own capacity, only the
    # deployment with devices of its own at the other's
    table = head_to_head(program, {"apart": apart, "together": together}, cm, [shared, alone], num_requests=200)
    assert table["apart"][alone] >= 0.9 and table["together"][shared] >= 0.9
    assert table["together"][alone] < 0.9 <= table["apart"][shared]


def test_stages_and_copies_follow_the_ray_layout(trunk_program):
    """The simulated stages and each variant's copies per stage are those the ray backend starts for the plan."""
    from planc.backends.ray_layout import layout_for
    from planc.plan_sim import staged_run

    program = trunk_program
    for plan in (program.plan, _placed(program, {"g0": [(0, 1), (2, 3)], "g1": [(4,)], "g2": [(4,), (5,)]})):
        layout = layout_for(["base", "ft0"], 82, plan, "gpu")
        run = staged_run(program, plan, [])
        assert [range(*s) for s in layout.stages] == plan.stage_ranges(82) and len(run.stages) == len(layout.stages)
        depth = max(lay["pp"] for g in plan.groups for lay in g["layouts"])  # lanes as planc serve keeps them
        assert run.config.lanes == min(depth, len(run.stages))
        for i, stage in enumerate(run.stages):
            actors = layout.actors_of(i)
            assert sorted(v for a in actors for v in a.variants) == sorted(stage)
            for a in actors:
                assert all(len(stage[v]) == a.copies for v in a.variants)
                assert [sorted({node for node, _ in c.devices}) for c in stage[a.variants[0]]] == [[n] for n in a.nodes]


def test_every_capacity_trial_spans_twenty_seconds_at_its_rate(monkeypatch):
    """A high-rate trial is not cut to `max_requests`: a 5 s burst would pass within a 3 s TTFT."""
    from types import SimpleNamespace

    import planc.plan_sim as plan_sim

    trials = []

    def fake(program, plan, cost_model, rate, num_requests, seed=0):
        trials.append((rate, num_requests))
        return {"slo": {"attainment": 1.0 if rate < 500 else 0.5}}

    monkeypatch.setattr(plan_sim, "simulate_plan", fake)
    plan = SimpleNamespace(predicted={"throughput_rps": 400.0}, settings={"slo": {"ttft_ms": 3000.0}})
    capacity = plan_sim.simulated_capacity(None, plan, None, max_requests=3000)
    assert 450 <= capacity < 500
    assert trials and all(n >= int(rate * 20) for rate, n in trials)
