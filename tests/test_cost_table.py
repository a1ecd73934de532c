"""A device's measured matmul table: lookup and interpolation, its use by CostModel, and profile files
(with a table, and written before tables and the newer overheads existed) round-tripping through YAML."""
from __future__ import annotations

import math

import pytest
import yaml

from planc.cluster import DeviceProfile, MatmulLinear, MatmulTable, Overheads, load_device
from planc.cost import BlockCost, CostModel
from planc.errors import SpecError
from planc.profile import write_profile

ROWS = [1, 2, 8]


def us(n: int, k: int) -> list[float]:
    """Synthetic times: 1 row streams the weight, 2 rows pay twice that (packing), 8 rows 4x."""
    return [n * k / 1e3, 2 * n * k / 1e3, 4 * n * k / 1e3]


def table(dims=(64, 256)) -> MatmulTable:
    return MatmulTable(rows=ROWS, linears=[MatmulLinear(shape=(n, k), us=us(n, k)) for n in dims for k in dims])


def test_grid_points_are_returned_as_measured():
    t = table()
    for n in (64, 256):
        for k in (64, 256):
            assert [t.linear_us(m, n, k) for m in ROWS] == pytest.approx(us(n, k))


def test_rows_between_measured_counts_interpolate_in_log_log():
    t = table()
    # 4 rows is halfway between 2 and 8 in log rows: the geometric mean of their times
    assert t.linear_us(4, 64, 64) == pytest.approx(math.sqrt(2 * 4) * 64 * 64 / 1e3)
    assert t.linear_us(2, 64, 64) < t.linear_us(3, 64, 64) < t.linear_us(8, 64, 64)


def test_rows_past_the_table_grow_at_the_last_time_per_row():
    t = table()
    slope = (4 - 2) * 64 * 64 / 1e3 / (8 - 2)
    assert t.linear_us(20, 64, 64) == pytest.approx(4 * 64 * 64 / 1e3 + 12 * slope)


def test_shapes_inside_the_grid_interpolate_bilinearly_in_log_dims():
    t = table()
    # (128, 128) is the log-midpoint of both axes: the geometric mean of the four corners, n*k/1e3 exactly here
    assert t.linear_us(1, 128, 128) == pytest.approx(128 * 128 / 1e3)
    assert t.linear_us(2, 128, 64) == pytest.approx(2 * 128 * 64 / 1e3)


def test_shapes_outside_the_grid_scale_with_their_size():
    t = table()
    assert t.linear_us(2, 1024, 256) == pytest.approx(4 * t.linear_us(2, 256, 256))  # 4x the largest out
    assert t.linear_us(1, 64, 16) == pytest.approx(t.linear_us(1, 64, 64) / 4)  # a quarter of the smallest in
    assert t.linear_us(0, 64, 64) == 0.0


def test_a_table_that_is_not_a_grid_or_not_increasing_is_refused_naming_the_field():
    bad_grid = {"rows": ROWS, "linears": [{"shape": [64, 64], "us": us(64, 64)}, {"shape": [256, 256], "us": us(256, 256)}]}
    with pytest.raises(SpecError, match="matmul_table.*grid"):
        load_device(device_dict(matmul_table=bad_grid))
    with pytest.raises(SpecError, match="matmul_table.rows.*increasing"):
        load_device(device_dict(matmul_table={"rows": [2, 1], "linears": [{"shape": [8, 8], "us": [1, 2]}]}))
    with pytest.raises(SpecError, match="matmul_table.linears.0.us.*positive"):
        load_device(device_dict(matmul_table={"rows": [1, 2], "linears": [{"shape": [8, 8], "us": [1, -2]}]}))


def device_dict(**extra) -> dict:
    return {"name": "cpu", "kind": "cpu", "memory_gb": 8, "peak_tflops": {"fp32": 0.1}, "mem_bw_gbps": 20,
            "matmul_efficiency": 1.0, **extra}


LAYER = BlockCost("layer", linear_flops_per_token=2 * (64 * 64 + 256 * 64), attn_flops_per_pair=256,
                  kv_bytes_per_token=512, act_bytes_per_token=1024, weight_bytes=4 * (64 * 64 + 256 * 64),
                  linears=((64, 64), (256, 64)))


def test_cost_model_takes_linears_from_the_table_and_the_rest_from_the_roofline():
    dev = load_device(device_dict(overheads={"block_call_us": 7.0, "per_seq_us": 2.0, "per_token_us": 0.5}))
    cm = CostModel(dev.model_copy(update={"matmul_table": table()}), dtype_bytes=4)
    got = cm.block_time(LAYER, prefill_tokens=8, attn_pairs=36, num_seqs=1)
    linears = (table().linear_us(8, 64, 64) + table().linear_us(8, 256, 64)) * 1e-6
    rest = max(36 * 256 / cm.peak, (8 * 512 + 8 * 1024) / cm.bandwidth)
    assert got == pytest.approx(linears + rest + (7.0 + 2.0 + 0.5 * 8) * 1e-6)
    # without a table (or with one of another dtype) the whole block is on the roofline, as before
    roof = CostModel(dev, dtype_bytes=4).block_time(LAYER, prefill_tokens=8, attn_pairs=36, num_seqs=1)
    flops = 8 * LAYER.linear_flops_per_token + 36 * 256
    assert roof == pytest.approx(max(flops / cm.peak, (LAYER.weight_bytes + 8 * 512 + 8 * 1024) / cm.bandwidth)
                                 + (7.0 + 2.0 + 0.5 * 8) * 1e-6)
    other = dev.model_copy(update={"matmul_table": table().model_copy(update={"dtype": "bf16"})})
    assert CostModel(other, dtype_bytes=4).block_time(LAYER, prefill_tokens=8, attn_pairs=36, num_seqs=1) == roof


def test_per_token_overhead_is_charged_on_prefill_tokens_only():
    dev = load_device(device_dict(overheads={"per_token_us": 3.0}))
    cm = CostModel(dev, dtype_bytes=4)
    assert cm.overhead_time(prefill_tokens=10, decode_seqs=5) == pytest.approx(30e-6)
    assert cm.overhead_time(decode_seqs=5) == 0.0


def test_shipped_gpu_profiles_have_no_table_and_stay_on_the_roofline():
    for name in ("H100-80GB", "A100-80GB", "H200"):
        dev = load_device(name)
        assert dev.matmul_table is None and dev.overheads.server_token_us == 0.0
        assert CostModel(dev).table is None


def test_profile_with_a_table_round_trips_and_reads_as_one_line_per_shape(tmp_path):
    dev = DeviceProfile(**device_dict(overheads=Overheads(block_call_us=150.0, per_token_us=5.2, server_token_us=104.0,
                                                          server_request_us=856.0)), matmul_table=table())
    path = write_profile(dev, tmp_path / "p.yaml")
    assert load_device(str(path)) == dev
    text = path.read_text()
    assert "rows: [1, 2, 8]" in text and "- shape: [64, 256]" in text
    assert "us: [16.384, 32.768, 65.536]" in text


OLD_PROFILE = """\
name: local
kind: cpu
memory_gb: 25.3
memory_utilization: 0.9
peak_tflops:
  fp32: 0.07329
mem_bw_gbps: 15.75
nvlink_gbps: null
matmul_efficiency: 1.0
bw_efficiency: 0.754
overheads:
  step_us: 0.0
  block_call_us: 859.22
  per_seq_us: 46.84
source: '`planc profile` on vm at 2026-11-25 17:50 UTC'
"""


def test_a_profile_written_before_tables_loads_on_the_roofline(tmp_path):
    path = tmp_path / "old.yaml"
    path.write_text(OLD_PROFILE)
    dev = load_device(str(path))
    assert dev.matmul_table is None
    assert dev.overheads == Overheads(block_call_us=859.22, per_seq_us=46.84)
    assert yaml.safe_load(OLD_PROFILE)["overheads"] == {"step_us": 0.0, "block_call_us": 859.22, "per_seq_us": 46.84}
    assert CostModel(dev, dtype_bytes=4).table is None


def test_table_scale_multiplies_every_lookup_and_defaults_to_one():
    t = table()
    scaled = t.model_copy(update={"scale": 1.25})
    assert t.scale == 1.0
    for rows, n, k in ((1, 64, 64), (3, 100, 200), (5000, 8192, 256)):
        assert scaled.linear_us(rows, n, k) == pytest.approx(1.25 * t.linear_us(rows, n, k))
