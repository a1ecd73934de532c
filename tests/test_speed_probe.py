"""The speed probe beside sim_fidelity's runs (benchmarks/speed_probe.py), and the profile scaling that
uses its ratio (sim_fidelity.speed_scaled)."""
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def test_the_probe_samples_each_part_until_stopped():
    from speed_probe import PARTS, SpeedProbe

    with SpeedProbe(interval=0.2) as probe:
        assert probe.wait_ready()
        time.sleep(1.0)  # a pass every 0.2 s
    assert len(probe.samples) >= 2
    assert all(len(row) == 1 + len(PARTS) and all(ms > 0 for ms in row[1:]) for row in probe.samples)
    assert probe.mean_ms == pytest.approx(sum(probe.parts_ms.values()))
    assert probe.cpu_s > 0 and probe._proc.returncode == 0


def test_a_speed_factor_scales_every_fitted_time():
    """A machine 1.5x slower: every step the profile predicts (table lookups, roofline parts, overheads)
    takes 1.5x as long, and planc serve's terms too."""
    from planc.cluster import DeviceProfile, MatmulLinear, MatmulTable, Overheads
    from planc.cost import BlockCost, CostModel
    from sim_fidelity import speed_scaled

    table = MatmulTable(rows=[1, 2, 8], scale=1.3, linears=[MatmulLinear(shape=(n, k), us=[n * k / 1e3 * r for r in (1, 2, 4)])
                                                         for n in (64, 256) for k in (64, 256)])
    device = DeviceProfile(name="cpu", kind="cpu", memory_gb=8, peak_tflops={"fp32": 0.1}, mem_bw_gbps=20,
                           matmul_efficiency=1.0, matmul_table=table,
                           overheads=Overheads(block_call_us=150.0, per_seq_us=2.0, per_token_us=0.5,
                                               server_token_us=104.0, engine_request_us=900.0))
    slow = speed_scaled(device, 1.5)
    assert slow.overheads.server_token_us == pytest.approx(156.0)
    assert slow.overheads.engine_request_us == pytest.approx(1350.0)
    layer = BlockCost("layer", linear_flops_per_token=2 * (64 * 64 + 256 * 64), attn_flops_per_pair=256,
                      kv_bytes_per_token=512, act_bytes_per_token=1024, weight_bytes=4 * (64 * 64 + 256 * 64),
                      linears=((64, 64), (256, 64)))
    fast, slower = CostModel(device, dtype_bytes=4), CostModel(slow, dtype_bytes=4)
    for kw in ({"decode_seqs": 3, "context_tokens": 300.0}, {"prefill_tokens": 40}):
        assert slower.block_time(layer, **kw) == pytest.approx(1.5 * fast.block_time(layer, **kw))
