"""A measured-table cost model for this CPU: an experiment for the simulator-fidelity benchmark.

planc's roofline (`CostModel.block_time`) takes a matmul's time as max(FLOPs / peak, bytes /
bandwidth). On this CPU's single-thread BLAS that misses by up to 3x for matmuls of a few rows:
one row streams the weight at ~15 GB/s, but two or more rows pack it first and read it at ~4-10
GB/s, and the packing does not overlap the arithmetic. Here the time of `F.linear` is measured
on a grid of (rows, square weight of n x n) and interpolated in log-log, and a CostModel subclass
charges every Linear of a block from the table (attention, KV and activations stay on the
roofline; overheads as the profile says). Not part of planc: it shows what a measured matmul
table in the device profile (issue 4: "roofline corrected by measured tables") would buy.

`measure_table` measures square weights (a device-wide table); `measure_arch_table` measures the
architecture's own Linear shapes (the issue's "per-block times of the example"), which removes the
error of carrying a square weight's time over to a 768 x 16000 head.
"""
from __future__ import annotations

import bisect
import math
import time

import numpy as np

ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
SIDES = (256, 512, 1024, 2048, 4096)


def measure_table(quick: bool = False) -> dict:
    """{rows, bytes, us[size][rows]}: best-of-N microseconds of F.linear(x (rows, n), w (n, n)) in fp32."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(1)
    table = []
    for n in SIDES:
        w = torch.randn(n, n)
        row = []
        for m in ROWS:
            x = torch.randn(m, n)
            F.linear(x, w)
            reps = max(2, min(20, int(2e8 / (2 * m * n * n + 1e7))))
            best = math.inf
            for _ in range(reps if not quick else 2):
                t0 = time.perf_counter()
                F.linear(x, w)
                best = min(best, time.perf_counter() - t0)
            row.append(best * 1e6)
        table.append(row)
    return {"rows": list(ROWS), "bytes": [4 * n * n for n in SIDES], "us": table}


def arch_shapes(arch) -> list[tuple[int, int]]:
    """(out, in) of every distinct Linear a decoder layer or the head of `arch` runs."""
    h, q, kv, i = arch.hidden_size, arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim, \
        arch.intermediate_size
    return list(dict.fromkeys([(q, h), (kv, h), (h, q), (i, h), (h, i), (arch.vocab_size, h)]))


def measure_arch_table(arch, rows=ROWS + (1024, 2048, 4096), cold: bool = True) -> dict:
    """{rows, shapes, us[shape][rows]}: F.linear times of the architecture's own weights.

    `cold`: each call uses the next of enough weight copies to fill 128 MB, so the weight comes from
    memory as in a real step (where a layer's weights were evicted by the rest of the chain), not
    from a cache that the previous repeat warmed; the median call is taken.
    """
    import statistics

    import torch
    import torch.nn.functional as F

    torch.set_num_threads(1)
    shapes = arch_shapes(arch)
    table = []
    for o, i in shapes:
        copies = [torch.randn(o, i) for _ in range(max(1, -(-128 * 2**20 // (4 * o * i))) if cold else 1)]
        row = []
        for m in rows:
            x = torch.randn(m, i)
            reps = max(3, min(len(copies) * 2, int(4e8 / (2 * m * o * i + 1e7))))
            times = [_cpu_timed(lambda w=copies[k % len(copies)]: F.linear(x, w)) for k in range(reps + 1)][1:]
            row.append((statistics.median(times) if cold else min(times)) * 1e6)
        table.append(row)
    return {"rows": list(rows), "shapes": [list(s) for s in shapes], "us": table, "cold": cold}


def arch_linear_us(table: dict, rows: int, shape: tuple[int, int]) -> float:
    i = [tuple(s) for s in table["shapes"]].index(tuple(shape))
    return _interp_log(table["rows"], table["us"][i], rows) if rows > 0 else 0.0


def _cpu_timed(fn) -> float:
    t0 = time.thread_time()
    fn()
    return time.thread_time() - t0


def _interp_log(xs, ys, x):
    """Piecewise-linear in log x / log y; beyond the ends, proportional to x (time scales with work)."""
    if x <= xs[0]:
        return ys[0] * (x / xs[0]) if x < xs[0] else ys[0]
    if x >= xs[-1]:
        return ys[-1] * x / xs[-1]
    i = bisect.bisect_right(xs, x) - 1
    f = (math.log(x) - math.log(xs[i])) / (math.log(xs[i + 1]) - math.log(xs[i]))
    return math.exp(math.log(ys[i]) + f * (math.log(ys[i + 1]) - math.log(ys[i])))


def linear_us(table: dict, rows: int, weight_bytes: float) -> float:
    """Interpolated microseconds of one Linear of `weight_bytes` over `rows` rows."""
    if rows <= 0:
        return 0.0
    rows_axis, sizes = table["rows"], table["bytes"]
    per_size = [_interp_log(rows_axis, t, rows) for t in table["us"]]
    if weight_bytes < sizes[0]:  # below the smallest measured: by the same rate per byte
        return per_size[0] * weight_bytes / sizes[0]
    return _interp_log(sizes, per_size, weight_bytes)


def block_linears(arch, kind: str) -> list[float]:
    """Weight bytes (fp32) of each Linear a block of `kind` runs."""
    h, q, kv, i = arch.hidden_size, arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim, \
        arch.intermediate_size
    if kind == "layer":
        return [4.0 * h * q, 4.0 * h * kv, 4.0 * h * kv, 4.0 * q * h, 4.0 * h * i, 4.0 * h * i, 4.0 * i * h]
    if kind == "head":
        return [4.0 * h * arch.vocab_size]
    return []


def block_shapes(arch, kind: str) -> list[tuple[int, int]]:
    h, q, kv, i = arch.hidden_size, arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim, \
        arch.intermediate_size
    if kind == "layer":
        return [(q, h), (kv, h), (kv, h), (h, q), (i, h), (i, h), (h, i)]
    if kind == "head":
        return [(arch.vocab_size, h)]
    return []


def table_cost_model(device, arch, table: dict):
    """A planc CostModel whose Linears come from `table` (see the module docstring)."""
    from planc.cost import CostModel

    if "shapes" in table:
        def linears_time(kind: str, tokens: int) -> float:
            return sum(arch_linear_us(table, tokens, s) for s in block_shapes(arch, kind)) * 1e-6
    else:
        def linears_time(kind: str, tokens: int) -> float:
            return sum(linear_us(table, tokens, w) for w in block_linears(arch, kind)) * 1e-6

    class TableCostModel(CostModel):
        def block_time(self, cost, tp=1, prefill_tokens=0, decode_seqs=0, context_tokens=0.0, attn_pairs=None,
                       num_seqs=None):
            if cost.kind not in ("layer", "head"):
                return super().block_time(cost, tp, prefill_tokens, decode_seqs, context_tokens, attn_pairs, num_seqs)
            tokens = prefill_tokens + decode_seqs
            if tokens == 0:
                return 0.0
            if attn_pairs is None:
                attn_pairs = context_tokens + prefill_tokens * (prefill_tokens + 1) / 2
            mm = linears_time(cost.kind, tokens)
            attention = max(attn_pairs * cost.attn_flops_per_pair / self.peak,
                            (context_tokens + prefill_tokens) * cost.kv_bytes_per_token / self.bandwidth)
            act = tokens * cost.act_bytes_per_token / self.bandwidth
            ov = self.device.overheads
            seqs = num_seqs if num_seqs is not None else decode_seqs + (1 if prefill_tokens else 0)
            return mm + attention + act + (ov.block_call_us + ov.per_seq_us * seqs) * 1e-6

    return TableCostModel


def check(table: dict, shapes=((2048, 768), (768, 2048), (768, 768), (16000, 768))) -> list[tuple]:
    """(shape, rows, measured us, table us) for shapes not on the grid: how well a square grid transfers."""
    import torch
    import torch.nn.functional as F

    out = []
    for o, i in shapes:
        w = torch.randn(o, i)
        for m in (1, 4, 32, 256):
            x = torch.randn(m, i)
            F.linear(x, w)
            best = min(_timed(lambda: F.linear(x, w)) for _ in range(5))
            out.append(((o, i), m, best * 1e6, linear_us(table, m, 4.0 * o * i)))
    return out


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


if __name__ == "__main__":
    t = measure_table()
    print(np.round(np.asarray(t["us"]), 1))
    for shape, m, meas, pred in check(t):
        print(shape, m, f"{meas:9.1f} {pred:9.1f} {100 * (pred / meas - 1):+6.1f}%")
