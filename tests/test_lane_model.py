"""planc.lane_model: the engine's round with L lanes, and the lane count a plan gets."""
from __future__ import annotations

import math

import pytest

from planc import lane_model as lm


def _stages(devices_of_stages, fixed=1e-3, grow=0.3):
    return [[((i,), {dev: 1.0}, fixed, grow)] for i, dev in enumerate(devices_of_stages)]


def test_round_time_is_the_fixed_point_of_the_lane_loop():
    """Two stages, each f = 1 ms per call plus 0.3 s of work per second of round. On devices of their
    own, one lane walks both: T = 2f + 2(0.3)T, so 5 ms; two lanes overlap them, each device doing
    two calls a round: T = 2f + 0.3T, 2.857 ms. On one shared device two lanes only add calls:
    T = 4f + 0.6T, 10 ms, against 5 ms with one."""
    apart, shared = _stages([0, 1]), _stages([0, 0])
    assert lm.round_time(apart, 1) == pytest.approx(2e-3 / 0.4, rel=1e-3)
    assert lm.round_time(apart, 2) == pytest.approx(2e-3 / 0.7, rel=1e-3)
    assert lm.round_time(shared, 1) == pytest.approx(2e-3 / 0.4, rel=1e-3)
    assert lm.round_time(shared, 2) == pytest.approx(4e-3 / 0.4, rel=1e-3)
    assert lm.round_time(apart, 1, load=2.0) == math.inf  # 1.2 s of work per second of round
    assert lm.round_time(apart, 2, load=2.0) == pytest.approx(2e-3 / 0.4, rel=1e-3)


def test_two_copies_on_one_device_share_it():
    """One stage, two copies time-sliced on one device: a round does both calls' work."""
    both = [[(("a",), {0: 1.0}, 1e-3, 0.2), (("b",), {0: 1.0}, 1e-3, 0.2)]]
    assert lm.round_time(both, 1) == pytest.approx(2e-3 / 0.6, rel=1e-3)


def test_plans_get_the_count_with_the_shortest_round(tiny_example, tmp_path):
    """The planner records the lanes it chose; serve and the simulation read them (plan_lanes)."""
    from planc.bundle import Bundle
    from planc.cli import main
    from planc.runtime.engine import plan_lanes

    out = tmp_path / "bundle"
    assert main(["compile", str(tiny_example), "-o", str(out), "--cluster", "H100-80GB"]) == 0
    plan = Bundle.open(out).plan
    chain_length = max(g["first_position"] + g["num_blocks"] for g in plan.groups)
    stages = len(plan.stage_ranges(chain_length))
    costs = lm.call_costs(plan, chain_length)
    assert len(costs) == stages and all(costs)
    rounds = [lm.round_time(costs, n, 0.7) for n in range(1, min(stages, lm.MAX_LANES) + 1)]
    assert plan.settings["lanes"] == 1 + rounds.index(min(rounds)) == plan_lanes(plan, stages)
