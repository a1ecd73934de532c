"""Simulating a plan on shared devices: steps of replicas that share a device are time-sliced.

The device clock is checked against hand-computed end times; the co-simulation of several engines
against independent runs (no shared device: the same records); a plan against itself with its two
block groups moved onto one device (about half the capacity)."""
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
from planc.workload import Fixed, GammaWorkload

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


@pytest.fixture(scope="module")
def two_group_program(tmp_path_factory):
    """base and a variant that changes every block: two block groups, half the traffic each."""
    from planc.planner import plan

    root = tmp_path_factory.mktemp("plan_sim")
    (root / "base").mkdir()
    (root / "base" / "config.json").write_text(json.dumps(LLAMA70B))
    (root / "w.yaml").write_text("kind: gamma\nrate: 10\nnum_requests: 200\nvariants: {base: 1, ft0: 1}\n"
                                 "prompt_tokens: {dist: fixed, value: 256}\noutput_tokens: {dist: fixed, value: 64}\n")
    (root / "model.yaml").write_text(
        "base: {name: base, path: ./base}\nvariants:\n  - {name: ft0, changes: [embedding, layers.0-79, head]}\n"
        "plan: {cluster: 8xH100-80GB, time_limit_s: 2, workload: w.yaml, slo: {tpot_ms: 100, ttft_ms: 2000}}\n")
    program = plan(root / "model.yaml")
    assert [g["users"] for g in program.plan.groups] == [["base"], ["ft0"]]
    return program


def _one_replica_each(plan: Plan, devices: list[tuple[int, ...]]) -> Plan:
    """The plan with one single-stage replica per group (TP 2, batch 64), group i on devices[i]."""
    groups, placements = [], []
    for g, devs in zip(plan.groups, devices):
        lay = {**g["layouts"][0], "pp": 1, "tp": 2, "batch": 64, "replicas": 1, "stage_blocks": [g["num_blocks"]]}
        groups.append({**g, "layouts": [lay]})
        placements.append(StagePlacement(g["id"], 0, 0, tuple(g["blocks"]), devs, 0, 2, 64, 1.0, 1.0))
    return dataclasses.replace(plan, groups=groups, placements=placements)


def test_two_groups_on_one_device_reach_about_half_the_capacity(two_group_program):
    from planc.plan_sim import simulated_capacity

    program = two_group_program
    cm = CostModel.for_cluster(program.extras["plan_inputs"]["cluster"], 2)
    apart = _one_replica_each(program.plan, [(0, 1), (2, 3)])
    together = _one_replica_each(program.plan, [(0, 1), (0, 1)])

    def capacity(p):
        return simulated_capacity(program, p, cm, num_requests=200, steps=5, max_requests=1500)

    alone, shared = capacity(apart), capacity(together)
    assert alone > 0 and 0.35 < shared / alone < 0.65


def test_a_plan_without_shared_devices_simulates_as_before(two_group_program):
    """Groups on devices of their own: the co-simulation gives each group's records exactly as a run
    of its engine alone (how plan_sim simulated every plan before it honoured shared devices)."""
    from planc.plan_sim import group_engines, plan_requests, simulate_plan
    from planc.sim_report import summarize_records

    program = two_group_program
    cm = CostModel.for_cluster(program.extras["plan_inputs"]["cluster"], 2)
    plan = _one_replica_each(program.plan, [(0, 1), (2, 3)])
    together = simulate_plan(program, plan, cm, rate=20.0, num_requests=300)
    requests = plan_requests(program, 20.0, 300)
    records = []
    for engine in group_engines(program, plan):  # every group's records are whole requests here
        mine = [r for r in requests if r.variant in engine.users]
        records += simulate(engine.model, cm, mine, engine.config, engine.replicas).requests
    slo = plan.settings["slo"]
    before = summarize_records(records, slo["ttft_ms"], slo["tpot_ms"])
    for key in ("ttft_ms", "tpot_ms", "e2e_ms"):  # equal but for the order of a sum
        assert together[key] == pytest.approx(before[key], rel=1e-12)
    assert together["slo"] == before["slo"] and together["requests"] == before["requests"]
    shared = simulate_plan(program, _one_replica_each(program.plan, [(0, 1), (0, 1)]), cm, rate=20.0, num_requests=300)
    assert shared["tpot_ms"]["p50"] > 1.5 * together["tpot_ms"]["p50"]
