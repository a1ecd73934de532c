"""Vidur's measured GPU timings (MIT; ../shared/data/gpu-profiles/README.md) as rows planc can compare.

Read by benchmarks/calibrate_gpu_profiles.py; `write_extract` writes the subset that
tests/test_cost_calibration.py reads from tests/data/gpu-profiles (with the licence).
"""
from __future__ import annotations

import csv
import shutil
from dataclasses import dataclass
from pathlib import Path

LINEAR_OPS = ("attn_pre_proj", "attn_post_proj", "mlp_up_proj", "mlp_down_proj")
EXTRACT_TOKENS = (1, 8, 32, 64, 256, 1024, 2048, 3072, 4096, 16384, 32768)
EXTRACT_SIZES = (2**11, 2**18, 2**20, 2**22, 2**24, 2**26)


@dataclass(frozen=True)
class LayerRow:
    gpu: str
    model: str
    shape: tuple[int, int, int, int, int]
    """n_head, n_kv_head, n_embd, n_expanded_embd, vocab_size (Vidur's column names)."""
    num_tokens: int
    tp: int
    op_ms: tuple[float, ...]
    """Median milliseconds of LINEAR_OPS, in that order."""

    @property
    def seconds(self) -> float:
        return sum(self.op_ms) * 1e-3


@dataclass(frozen=True)
class CollectiveRow:
    gpu: str
    num_workers: int
    size: int
    """Bytes."""
    seconds: float


def read_layer_rows(data: Path) -> list[LayerRow]:
    """Every mlp.csv under data/compute; a (model, tokens, TP) measured twice keeps the smaller sum
    (repeat rows differ by 1-2%, and the fastest is the least disturbed run)."""
    best: dict[tuple, LayerRow] = {}
    for path in sorted(data.glob("compute/*/*/*/mlp.csv")):
        gpu, model = path.parts[-4], path.parts[-2]
        with path.open(newline="") as f:
            for r in csv.DictReader(f):
                assert r["use_gated_mlp"] == "True", path  # the cost model's layer is the gated Llama MLP
                row = LayerRow(gpu, model, tuple(int(r[k]) for k in ("n_head", "n_kv_head", "n_embd",
                                                                       "n_expanded_embd", "vocab_size")),
                               int(r["num_tokens"]), int(r["num_tensor_parallel_workers"]),
                               tuple(float(r[f"time_stats.{op}.median"]) for op in LINEAR_OPS))
                key = (gpu, model, row.num_tokens, row.tp)
                if key not in best or row.seconds < best[key].seconds:
                    best[key] = row
    return list(best.values())


def read_allreduce_rows(data: Path) -> list[CollectiveRow]:
    """all_reduce.csv rows inside one node (num_workers == devices_per_node): TP never crosses nodes."""
    rows = []
    for path in sorted(data.glob("network/*_dgx/all_reduce.csv")):
        gpu = path.parts[-2].removesuffix("_dgx")
        with path.open(newline="") as f:
            rows += [CollectiveRow(gpu, int(r["num_workers"]), int(r["size"]),
                                   float(r["time_stats.all_reduce.median"]) * 1e-3)
                     for r in csv.DictReader(f) if r["num_workers"] == r["devices_per_node"]]
    return rows


def read_sendrecv_rows(data: Path) -> list[CollectiveRow]:
    """send_recv.csv between two GPUs of one node (devices_per_node 2): a pipeline hop."""
    rows = []
    for path in sorted(data.glob("network/*_dgx/send_recv.csv")):
        with path.open(newline="") as f:
            rows += [CollectiveRow(path.parts[-2].removesuffix("_dgx"), 2, int(r["size"]),
                                   float(r["time_stats.send_recv.median"]) * 1e-3)
                     for r in csv.DictReader(f) if r["devices_per_node"] == "2"]
    return rows


def nearest_sizes(rows: list[CollectiveRow], wanted: tuple[int, ...]) -> list[int]:
    """Measured sizes nearest to `wanted` (bytes): below 1 MB the tables step by 8 KB from 2 KB."""
    measured = sorted({r.size for r in rows})
    return [min(measured, key=lambda m: abs(m - w)) for w in wanted]


def write_extract(out: Path, data: Path, layers: list[LayerRow], allreduce: list[CollectiveRow]) -> None:
    """The few rows tests/test_cost_calibration.py checks, so it runs without ../shared."""
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(data / "LICENSE-vidur", out / "LICENSE-vidur")
    with (out / "linear_layer.csv").open("w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["gpu", "model", "n_head", "n_kv_head", "n_embd", "n_expanded_embd", "vocab_size",
                    "num_tokens", "tp", *(f"{op}_median_ms" for op in LINEAR_OPS)])
        for r in sorted(layers, key=lambda r: (r.gpu, r.model, r.tp, r.num_tokens)):
            if r.num_tokens in EXTRACT_TOKENS:
                w.writerow([r.gpu, r.model, *r.shape, r.num_tokens, r.tp, *(f"{x:g}" for x in r.op_ms)])
    with (out / "all_reduce.csv").open("w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["gpu", "num_workers", "size", "median_ms"])
        sizes = set(nearest_sizes(allreduce, EXTRACT_SIZES))
        for r in sorted(allreduce, key=lambda r: (r.gpu, r.num_workers, r.size)):
            if r.size in sizes:
                w.writerow([r.gpu, r.num_workers, r.size, f"{r.seconds * 1e3:g}"])
