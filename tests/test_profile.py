"""`planc profile`: the measured CPU profile loads as a device and its figures are plausible."""
from __future__ import annotations

import numpy as np
import pytest

from planc.cli import main
from planc.cluster import Cluster, load_device, load_local_profile
from planc.profile_calibrate import _nonnegative_lstsq


@pytest.fixture(scope="module")
def profile_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("profile") / "sub" / "local-profile.yaml"
    assert main(["profile", "--quick", "--out", str(path)]) == 0
    return path


def test_written_profile_loads_with_plausible_figures(profile_path):
    dev = load_device(str(profile_path))
    assert (dev.name, dev.kind, dev.matmul_efficiency) == ("local", "cpu", 1.0)
    assert 1.0 < dev.peak_tflops["fp32"] * 1e3 < 20_000  # GFLOP/s of one core
    assert 0.5 < dev.mem_bw_gbps < 2_000
    assert 0.0 < dev.bw_efficiency <= 1.0
    assert 0.5 < dev.memory_gb < 100_000
    ov = dev.overheads
    # planc's engine does Python work per step and per block call: some fixed cost must be found
    assert ov.step_us + ov.block_call_us + ov.per_seq_us > 10
    assert max(ov.step_us, ov.block_call_us, ov.per_seq_us) < 100_000
    assert "planc profile --quick" in dev.source and "fitted on" in dev.source
    # the measured matmul table: a grid whose times grow with the weight and, past a few rows, with the rows
    table = dev.matmul_table
    assert table is not None and table.dtype == "fp32" and len(table.linears) == 9
    assert table.linear_us(1, 4096, 4096) > 10 * table.linear_us(1, 128, 128)
    assert table.linear_us(2048, 1024, 1024) > 10 * table.linear_us(16, 1024, 1024)
    # planc serve's own work per streamed token and per request: some Python per token, more per request
    assert 1 < ov.server_token_us < 100_000 and ov.server_request_us > ov.server_token_us
    # and what it costs the engine thread beyond that (the GIL, the server's wake-ups): something per step or token
    assert ov.engine_step_us + ov.engine_token_us > 0 and max(ov.engine_step_us, ov.engine_token_us) < 100_000


def test_local_profile_is_read_not_remeasured(profile_path):
    assert load_local_profile(profile_path) == load_device(str(profile_path))
    c = Cluster(devices_per_node=1, device=load_local_profile(profile_path))
    assert c.device.kind == "cpu"


def test_nonnegative_fit_recovers_overheads_and_drops_negative_terms():
    rng = np.random.default_rng(0)
    a = np.column_stack([np.ones(30), rng.integers(4, 40, 30), rng.integers(0, 200, 30)]).astype(float)
    y = a @ np.array([300.0, 50.0, 7.0])
    assert _nonnegative_lstsq(a, y) == pytest.approx([300.0, 50.0, 7.0])
    # a column that would get a negative weight is dropped and the rest refitted
    y2 = a @ np.array([300.0, 50.0, 0.0]) - 0.5 * a[:, 2]
    coef = _nonnegative_lstsq(a, y2)
    assert coef[2] == 0.0 and (coef >= 0).all()


def test_live_fit_recovers_overheads_and_table_scale_despite_disturbed_steps():
    """Steps made from known overheads and a table scale of 1.3, a fifth of them slowed by other load (+60 to
    +100%): the fit finds the true figures; a least-squares fit over all steps would be pulled up by the slow ones."""
    from planc.cluster import DeviceProfile
    from planc.profile_calibrate import FITTED, fit_steps

    rng = np.random.default_rng(1)
    n = 400
    counts = np.column_stack([np.ones(n), rng.integers(6, 40, n), rng.integers(1, 60, n), rng.integers(0, 600, n),
                              rng.integers(0, 8, n)]).astype(float)
    true = np.array([900.0, 120.0, 40.0, 3.0, 250.0])
    base, table = rng.uniform(1e-4, 2e-3, n), rng.uniform(5e-4, 2e-2, n)
    measured = base + 0.3 * table + counts @ true * 1e-6
    slow = rng.random(n) < 0.2
    measured[slow] *= rng.uniform(1.6, 2.0, slow.sum())
    dev = DeviceProfile(name="t", memory_gb=1, peak_tflops={"fp32": 1.0}, mem_bw_gbps=10.0)
    fit = fit_steps(dev, base, table, counts, measured)
    got = [getattr(fit.overheads, k) for k in FITTED]
    assert got == pytest.approx(true.tolist(), rel=0.02)
    assert fit.table_scale == pytest.approx(1.3, rel=0.01)
    assert fit.rel_error < 1e-3 and fit.num_steps == n
    # without a table (zero column) the scale stays 1 and the overheads are still found
    plain = fit_steps(dev, base + 0.3 * table, np.zeros(n), counts, measured)
    assert plain.table_scale == 1.0 and plain.overheads.decode_call_us == pytest.approx(250.0, rel=0.02)


def test_live_fit_separates_few_row_and_many_row_table_scales():
    """Decode-sized Linears 1.35x their isolated times, prefill-sized ones 1.05x: the split fit finds both
    scales and the overheads; one scale for both fits neither and leaves a larger error."""
    from planc.cluster import DeviceProfile
    from planc.profile_calibrate import FITTED, fit_steps

    rng = np.random.default_rng(2)
    n = 300
    counts = np.column_stack([np.ones(n), rng.integers(6, 40, n), rng.integers(1, 60, n), rng.integers(0, 600, n),
                              rng.integers(0, 8, n)]).astype(float)
    true = np.array([500.0, 150.0, 30.0, 2.0, 300.0])
    few = rng.uniform(5e-4, 2e-2, n)
    many = np.where(rng.random(n) < 0.3, rng.uniform(1e-2, 5e-2, n), 0.0)  # a third of the steps carry a prefill
    base = rng.uniform(1e-4, 2e-3, n)
    measured = base + 1.35 * few + 1.05 * many + counts @ true * 1e-6 - few - many
    dev = DeviceProfile(name="t", memory_gb=1, peak_tflops={"fp32": 1.0}, mem_bw_gbps=10.0)
    fit = fit_steps(dev, base, np.column_stack([few, many]), counts, measured)
    assert (fit.table_scale, fit.many_row_scale) == (pytest.approx(1.35, rel=0.01), pytest.approx(1.05, rel=0.01))
    assert [getattr(fit.overheads, k) for k in FITTED] == pytest.approx(true.tolist(), rel=0.02)
    one = fit_steps(dev, base, np.column_stack([few, many]), counts, measured, split=False)
    assert one.table_scale == one.many_row_scale and one.rel_error > 10 * fit.rel_error


def test_scaled_table_scales_few_and_many_row_times_apart():
    from planc.cluster import MatmulLinear, MatmulTable
    from planc.profile_calibrate import SPLIT_ROWS, scaled_table

    rows = [1, SPLIT_ROWS, 2 * SPLIT_ROWS, 8 * SPLIT_ROWS]
    table = MatmulTable(rows=rows, linears=[MatmulLinear(shape=(n, k), us=[10.0, 40.0, 80.0, 300.0])
                                            for n in (64, 256) for k in (64, 256)])
    out = scaled_table(table, 1.5, 0.5)
    assert all(lin.us == [15.0, 60.0, 40.0, 150.0] for lin in out.linears)
    assert out.linear_us(4 * SPLIT_ROWS, 64, 64) == pytest.approx(0.5 * table.linear_us(4 * SPLIT_ROWS, 64, 64))
    assert out.linear_us(3, 64, 64) == pytest.approx(1.5 * table.linear_us(3, 64, 64))


def test_live_fit_predicts_the_mean_step_not_the_median_under_skewed_noise():
    """Step times with right-skewed noise (most steps at their cost, some 10-40% slower, as on this VM): the
    simulator sums steps (TPOT, throughput), so the fit must match the total time; the median regression
    alone comes out below it."""
    from planc.cluster import DeviceProfile
    from planc.profile_calibrate import fit_steps

    rng = np.random.default_rng(3)
    n = 600
    counts = np.column_stack([np.ones(n), rng.integers(6, 40, n), rng.integers(1, 60, n), rng.integers(0, 600, n),
                              rng.integers(0, 8, n)]).astype(float)
    base, table = rng.uniform(1e-4, 2e-3, n), rng.uniform(5e-4, 2e-2, n)
    clean = base + 0.3 * table + counts @ np.array([400.0, 100.0, 40.0, 3.0, 250.0]) * 1e-6
    measured = clean * np.where(rng.random(n) < 0.25, rng.uniform(1.1, 1.4, n), 1.0) * rng.normal(1.0, 0.01, n)
    dev = DeviceProfile(name="t", memory_gb=1, peak_tflops={"fp32": 1.0}, mem_bw_gbps=10.0)
    mean, median = fit_steps(dev, base, table, counts, measured), fit_steps(dev, base, table, counts, measured, mean=False)
    total = measured.sum()
    assert sum(p for _, _, p in mean.samples) == pytest.approx(total, rel=0.01)
    assert sum(p for _, _, p in median.samples) < 0.97 * total


def test_toll_fit_leaves_out_steps_after_the_engine_idled():
    """A step after an idle gap pays nothing for the tokens streamed meanwhile (the server did that work while
    the engine had none): such steps, and steps after one that sampled nothing, are not fitted."""
    from planc.profile_server import TimedStep, fit_step_toll

    steps, t = [], 0.0
    for i in range(60):
        idle = 0.05 if i % 5 == 0 else 0.0  # every fifth step starts after the engine idled
        t += idle
        loss = 0.0 if idle else (200 + 100 * 3) * 1e-6
        steps.append(TimedStep(t, 0.005 + loss, 0.005, 3 if i % 7 else 0, 0))
        t += 0.005 + loss
    request_us, token_us, step_us = fit_step_toll(steps)
    # steps after a zero-sample step have loss too, but are left out with those after idle gaps: 500 us in all
    assert request_us == 0.0 and step_us + 3 * token_us == pytest.approx(500.0, abs=1.0)


def test_step_timer_sees_every_sampling_step_and_the_requests_submitted(tmp_path):
    """One request at a time: a request of t output tokens takes t steps that sample one token each; the timer
    sees exactly those (not the idle loop's iterations), each no shorter than its CPU time."""
    import threading

    from planc.bundle import Bundle
    from planc.profile_calibrate import calibration_bundles
    from planc.profile_server import _StepTimer
    from planc.runtime.engine import Engine
    from planc.runtime.sampling import SamplingParams

    engine = Engine(Bundle.open(calibration_bundles(tmp_path)[0]))
    timer = _StepTimer(engine)
    with engine.in_thread():
        for i in range(3):
            done = threading.Event()
            engine.submit("base", [5 + i, 6, 7, 8], SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True),
                          lambda ev, done=done: ev.finished and done.set())
            assert done.wait(30)
    assert len(timer.steps) == 15 and all(s.sampled == 1 for s in timer.steps)
    assert sum(s.submitted for s in timer.steps) <= 3
    # the same interval on two clocks: the thread's CPU time never exceeds the wall time by more than the two
    # clocks' jitter on this VM (a CI run read one step 1% over; one whose steps were all CPU read 3 us over in
    # 48 ms), per step and in sum
    assert sum(s.cpu_s for s in timer.steps) <= sum(s.wall_s for s in timer.steps) * 1.001 + 1e-4
    assert all(s.wall_s >= s.cpu_s - 1e-3 for s in timer.steps), [(s.wall_s, s.cpu_s) for s in timer.steps]
    assert len(timer.submit_times) == 3


def test_step_timer_skips_prompt_chunks_that_sample_nothing(tmp_path):
    """A 20-token prompt prefilled 8 tokens a step: its first two steps stream nothing and are not timed."""
    import threading

    from planc.bundle import Bundle
    from planc.profile_calibrate import calibration_bundles
    from planc.profile_server import _StepTimer
    from planc.runtime.engine import Engine, EngineConfig
    from planc.runtime.sampling import SamplingParams

    engine = Engine(Bundle.open(calibration_bundles(tmp_path)[0]), EngineConfig(max_batch_tokens=8))
    timer = _StepTimer(engine)
    done = threading.Event()
    with engine.in_thread():
        engine.submit("base", list(range(5, 25)), SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True),
                      lambda ev: ev.finished and done.set())
        assert done.wait(30)
    assert [s.sampled for s in timer.steps] == [1, 1, 1, 1]
