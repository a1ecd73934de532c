"""planc.lane_model: the engine's round with L lanes, and the lane count a plan gets."""
from __future__ import annotations

import pytest

from planc import lane_model as lm


def _stages(devices_of_stages, fixed=1e-3, grow=3e-3):
    return [[((i,), {dev: 1.0}, fixed, grow)] for i, dev in enumerate(devices_of_stages)]


def test_lanes_overlap_stages_on_devices_of_their_own():
    """Two stages, each call 1 ms plus 3 ms of work split between the lanes. One lane walks both: 8 ms a
    round. Two lanes on devices of their own pipeline them, each device running two 2.5-ms calls a
    round: 5 ms. On one shared device two lanes only add calls: 4 x 2.5 = 10 ms."""
    apart, shared = _stages([0, 1]), _stages([0, 0])
    assert lm._measured_round(apart, 1, 1.0) == pytest.approx(8e-3)
    assert lm._measured_round(apart, 2, 1.0) == pytest.approx(5e-3)
    assert lm._measured_round(shared, 1, 1.0) == pytest.approx(8e-3)
    assert lm._measured_round(shared, 2, 1.0) == pytest.approx(10e-3)
    assert lm._measured_round(apart, 1, 0.5) == pytest.approx(5e-3)  # half the sequences: 1 + 1.5 ms a call


def test_two_copies_on_one_device_share_it():
    """One stage, two copies time-sliced on one device: a round does both calls' work."""
    both = [[(("a",), {0: 1.0}, 1e-3, 2e-3), (("b",), {0: 1.0}, 1e-3, 2e-3)]]
    assert lm._measured_round(both, 1, 1.0) == pytest.approx(6e-3)


def _mixed_plan(devices_b: tuple, tpot_ms: float = 1000.0):
    """One group over a 2-block chain, two single-device copies: batch 64 on device 0, batch 16 on
    `devices_b`; each call costs 1 ms plus 10 ms per request over 10 output tokens (1 ms a sequence)."""
    from planc.plan import Plan, StagePlacement

    def layout(batch):
        return {"pp": 1, "tp": 1, "batch": batch, "replicas": 1, "stage_blocks": [2], "tpot_ms": 0.0, "ttft_ms": 0.0,
                "cap_rps": batch / 10.0, "tau_ms": [10.0], "fixed_ms": [1.0]}
    group = {"id": "g0", "blocks": ["a", "b"], "num_blocks": 2, "first_position": 0, "instance_keys": ["a", "b"],
             "users": ["base"], "share": 1.0, "layouts": [layout(64), layout(16)], "lora": []}
    placements = [StagePlacement("g0", 0, 0, ("a", "b"), (0,), 0, 1, 64, 1.0, 1.0),
                  StagePlacement("g0", 0, 0, ("a", "b"), devices_b, 0, 1, 16, 1.0, 1.0)]
    return Plan("test", "throughput", [group], placements, predicted={"variants": {"base": {"ttft_ms": 0.0}}},
                solver={}, settings={"output_tokens": 10, "prompt_tokens": 10, "slo": {"tpot_ms": tpot_ms}})


def test_a_stages_copies_step_together_at_the_largest_ones_pace():
    """80 sequences in flight (what the two copies hold): 64 on the large copy, 16 on the small one. The
    lane waits for the large copy's 65 ms call, so the small one's sequences advance at that pace too:
    80 / (10 tokens x 65 ms), not the 98 + 94 req/s the copies would give each at its own pace. On one
    device the calls are time-sliced: 82 ms. With a 41 ms TPOT SLO, 62.5% of the sequences fit."""
    apart = _mixed_plan((1,))
    assert lm.engine_capacity(apart, 2, 1) == pytest.approx(80 / (10 * 0.065), rel=1e-3)
    assert lm.engine_capacity(_mixed_plan((0,)), 2, 1) == pytest.approx(80 / (10 * 0.082), rel=1e-3)
    assert lm.engine_capacity(_mixed_plan((1,), tpot_ms=41.0), 2, 1) == pytest.approx(0.625 * 80 / 0.41, rel=1e-3)
    assert lm.engine_capacity(_mixed_plan((1,), tpot_ms=0.5), 2, 1) == 0.0


def test_plans_get_the_count_with_the_highest_engine_capacity(tiny_example, tmp_path):
    """The planner records the lanes it chose; serve and the simulation read them (plan_lanes)."""
    from planc.bundle import Bundle
    from planc.cli import main
    from planc.runtime.engine import plan_lanes

    out = tmp_path / "bundle"
    assert main(["compile", str(tiny_example), "-o", str(out), "--cluster", "H100-80GB"]) == 0
    plan = Bundle.open(out).plan
    chain_length = max(g["first_position"] + g["num_blocks"] for g in plan.groups)
    stages = len(plan.stage_ranges(chain_length))
    costs = lm.call_costs(plan, chain_length, plan.engine_limits(chain_length, 1)[0])
    assert len(costs) == stages and all(costs)
    capacity = {n: lm.engine_capacity(plan, chain_length, n) for n in range(1, min(stages, lm.MAX_LANES) + 1)}
    assert plan.settings["lanes"] == lm.best_lanes(plan, chain_length) == plan_lanes(plan, stages)
    assert all(capacity[plan.settings["lanes"]] * (1 + lm.LANE_MARGIN) >= c for c in capacity.values())
    assert plan.predicted["engine_capacity_rps"] == pytest.approx(capacity[plan.settings["lanes"]])
