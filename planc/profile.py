"""`planc profile`: measure this machine's CPU as a DeviceProfile for the cost model and simulator.

Three microbenchmarks on one thread (the runtime serves with one intra-op thread): fp32 matmul
FLOP/s on a large product (the peak, so matmul_efficiency is 1.0), memory bandwidth of a large
copy, and the rate at which a one-row matmul streams a weight matrix too large for the caches (that
rate over the copy bandwidth is bw_efficiency: decode reads weights that way). Then a table of
Linear times over weight shapes and row counts (the cost model uses it instead of the roofline's
matmul term: a few rows of a one-thread BLAS call are far off the roofline), the runtime's fixed
overheads and the table's live/isolated scale fitted on steps of a live run of planc's own engine
(`planc.profile_calibrate`), and what `planc serve`'s HTTP thread costs per request and streamed
token, and what it costs the engine thread per request, token and step, measured on the tiny example
(`planc.profile_server`, `example_bundle`).

>>> profile = measure_local(quick=True)          # doctest: +SKIP
>>> write_profile(profile, "local-profile.yaml")  # doctest: +SKIP
"""
from __future__ import annotations

import datetime
import os
import platform
import socket
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional, Union

import torch
import yaml

from planc.cluster import DeviceProfile, MatmulLinear, MatmulTable
from planc.profile_calibrate import SPLIT_ROWS, calibration_bundles, refit, with_threads
from planc.profile_server import measure_server


def _best_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Best CPU seconds of this thread over `repeats` calls: CPU time, not wall time, so that other
    processes sharing the cores (tests, builds) do not inflate the figures."""
    fn()  # first call pays allocation and code paths
    best = float("inf")
    for _ in range(repeats):
        start = time.thread_time()
        fn()
        best = min(best, time.thread_time() - start)
    return best


def matmul_flops(quick: bool = False) -> float:
    """Best fp32 FLOP/s over a few large products (prefill-sized and square)."""
    n = 512 if quick else 1024
    shapes = [(n, n, n), (n // 2, 2 * n, 2 * n)]
    best = 0.0
    for m, k, o in shapes:
        a, b = torch.randn(m, k), torch.randn(k, o)
        best = max(best, 2.0 * m * k * o / _best_seconds(lambda: a @ b, 3 if quick else 5))
    return best


def copy_bandwidth(quick: bool = False) -> float:
    """Bytes per second of a large copy (each byte read and written)."""
    src = torch.empty((32 if quick else 128) * 2**20 // 4)
    dst = torch.empty_like(src)
    return 2.0 * src.numel() * 4 / _best_seconds(lambda: dst.copy_(src), 3 if quick else 5)


def weight_stream_rate(quick: bool = False) -> float:
    """Bytes per second at which a one-row matmul reads a weight matrix larger than the caches."""
    n = 2048 if quick else 4096
    w, x = torch.randn(n, n), torch.randn(1, n)  # w is (out, in), as the runtime's Linear weights are
    return n * n * 4 / _best_seconds(lambda: torch.nn.functional.linear(x, w), 5 if quick else 10)


TABLE_ROWS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128, 256, 512, 1024, 2048)
TABLE_DIMS = (64, 128, 256, 512, 1024, 2048, 4096)
TABLE_DIMS_QUICK = (128, 1024, 4096)
_COLD_BYTES = 64 * 2**20
"""Weights cycled through per shape: more than the last-level cache, so each call reads its weight from
memory, as a step does after the rest of the chain evicted it (256 MB measured the same here)."""
_MAX_FLOPS = 4e8
"""Row counts of a shape are measured up to this many FLOPs per call (~5 ms here); larger ones are
compute-bound, and the table extrapolates them at the last measured time per row."""


def matmul_table(quick: bool = False, dims: Optional[tuple[int, ...]] = None) -> MatmulTable:
    """Median CPU time of F.linear over a grid of weight shapes (out, in in `dims`) and TABLE_ROWS rows,
    weights cold. About 15 s (`quick` about 2 s); larger weights are extrapolated in proportion to size."""
    dims = dims or (TABLE_DIMS_QUICK if quick else TABLE_DIMS)
    pool = torch.randn((_COLD_BYTES // 4) if not quick else (_COLD_BYTES // 16))  # weights are slices of it
    linears = [MatmulLinear(shape=(n, k), us=_linear_times(pool, n, k, quick)) for n in dims for k in dims]
    return MatmulTable(dtype="fp32", cold=True, rows=list(TABLE_ROWS), linears=linears)


def _linear_times(pool: torch.Tensor, out_features: int, in_features: int, quick: bool) -> list[float]:
    size = out_features * in_features
    copies = [pool[i * size:(i + 1) * size].view(out_features, in_features) for i in range(pool.numel() // size)] \
        or [torch.randn(out_features, in_features)]
    times = []
    for m in TABLE_ROWS:
        if len(times) >= 2 and 2.0 * m * out_features * in_features > _MAX_FLOPS:
            break
        x = torch.randn(m, in_features)
        first = _cpu_seconds(lambda: torch.nn.functional.linear(x, copies[-1]))  # pays code paths: not kept
        # small calls are noisy (a few us, the scheduler's and caches' doing): more of them, ~30 ms of calls
        reps = 3 if quick else max(5, min(61, int(0.03 / max(first, 1e-6))))
        samples = [_cpu_seconds(lambda w=copies[i % len(copies)]: torch.nn.functional.linear(x, w))
                   for i in range(reps)]
        times.append(round(statistics.median(samples) * 1e6, 2))
    return times


def _cpu_seconds(fn: Callable[[], object]) -> float:
    start = time.thread_time()
    fn()
    return time.thread_time() - start


def memory_gb() -> float:
    return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measure_local(quick: bool = False, progress: Optional[Callable[[str], None]] = None) -> DeviceProfile:
    """Measure this machine (about 2 minutes; `quick` about 1, for tests) on one thread, as the runtime runs:
    most of it is two ~15 s live engine runs and the server rounds."""
    return with_threads(lambda: _measure(quick, progress or (lambda _msg: None)))


def _measure(quick: bool, say: Callable[[str], None]) -> DeviceProfile:
    say("matmul FLOP/s")
    flops = matmul_flops(quick)
    say("memory bandwidth")
    bandwidth = copy_bandwidth(quick)
    stream = weight_stream_rate(quick)
    device = DeviceProfile(name="local", kind="cpu", memory_gb=memory_gb(), peak_tflops={"fp32": round(flops / 1e12, 5)},
                           mem_bw_gbps=round(bandwidth / 1e9, 2), matmul_efficiency=1.0,
                           bw_efficiency=round(min(1.0, stream / bandwidth), 3))
    say("matmul table")
    device = device.model_copy(update={"matmul_table": matmul_table(quick)})
    say("building the calibration models")
    with tempfile.TemporaryDirectory(prefix="planc-profile-") as tmp:
        from planc.bundle import Bundle

        bundle_dirs = calibration_bundles(Path(tmp))
        device, fit = refit(device, [Bundle.open(d) for d in bundle_dirs], quick, say)
        say("planc serve's cost per request and token, on the tiny example")
        server = measure_server(example_bundle(Path(tmp) / "example"), quick, say)
    overheads = device.overheads.model_copy(update={
        "server_request_us": server.request_us, "server_token_us": server.token_us,
        "engine_request_us": server.engine_request_us, "engine_token_us": server.engine_token_us,
        "engine_step_us": server.engine_step_us})
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    source = (f"`planc profile{' --quick' if quick else ''}` on {socket.gethostname()} ({cpu_name()}, "
              f"{os.cpu_count()} cores, torch {torch.__version__}, 1 thread) at {when}; overheads and table scale "
              f"fitted on {fit.num_steps} steps of live engine runs, median step error {100 * fit.rel_error:.1f}%; "
              f"table times x{fit.table_scale:.3f} up to {SPLIT_ROWS} rows, x{fit.many_row_scale:.3f} beyond "
              f"(the many-row ratio is in the times)")
    return device.model_copy(update={"overheads": overheads, "source": source})


def example_bundle(root: Path) -> Path:
    """The tiny example (`planc example`: trained weights, its own tokenizer) compiled to `root/bundle`. planc
    serve's costs are measured on it rather than on the calibration models: they stream the text of random
    weights, and the server's work per token (detokenizing, JSON) and what it costs the engine depend on the
    text streamed (the example's server CPU per token was 1.26x, the engine's loss per token 1.65x the
    calibration model's; benchmarks/RESULTS.md)."""
    import planc
    from planc.example import write_tiny_example

    write_tiny_example(root)
    out = root / "bundle"
    planc.emit(planc.compile(planc.load(root / "model.yaml")), out=out)
    return out


def write_profile(profile: DeviceProfile, path: Union[str, Path]) -> Path:
    """Write `profile` as YAML (creating the directory; replaced atomically) and return the path."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    text = yaml.dump(profile.model_dump(mode="json"), Dumper=_ProfileDumper, sort_keys=False, width=200)
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


class _ProfileDumper(yaml.SafeDumper):
    """Lists of numbers on one line (a matmul table's shape and times), everything else in block style."""


def _represent_list(dumper: yaml.SafeDumper, data: list):
    flow = all(isinstance(x, (int, float, str)) for x in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_ProfileDumper.add_representer(list, _represent_list)


def profile_rows(profile: DeviceProfile) -> list[tuple[str, str]]:
    """(figure, value) pairs for the CLI's table."""
    ov = profile.overheads
    return [("matmul (fp32, 1 thread)", f"{profile.peak_tflops['fp32'] * 1e3:.1f} GFLOP/s"),
            ("memory bandwidth (copy)", f"{profile.mem_bw_gbps:.1f} GB/s"),
            ("weight streaming (1-row matmul)", f"{profile.mem_bw_gbps * profile.bw_efficiency:.1f} GB/s "
                                                f"(bw_efficiency {profile.bw_efficiency:.2f})"),
            ("per step", f"{ov.step_us:.0f} us"), ("per block call (or own attention call)", f"{ov.block_call_us:.1f} us"),
            ("per sequence in a block call", f"{ov.per_seq_us:.1f} us"),
            ("per prefill token in a block call", f"{ov.per_token_us:.2f} us"),
            ("per batched decode attention call", f"{ov.decode_call_us:.1f} us"),
            ("planc serve, per streamed token", f"{ov.server_token_us:.1f} us (engine loses {ov.engine_token_us:.0f} us)"),
            ("planc serve, per step that streams", f"engine loses {ov.engine_step_us:.0f} us"),
            ("planc serve, per request", f"{ov.server_request_us:.0f} us (engine loses {ov.engine_request_us:.0f} us)"),
            ("matmul table", _table_summary(profile)), ("memory", f"{profile.memory_gb:g} GB")]


def _table_summary(profile: DeviceProfile) -> str:
    table = profile.matmul_table
    if table is None:
        return "none (roofline)"
    dims = sorted({n for lin in table.linears for n in lin.shape})
    return (f"{len(table.linears)} weight shapes ({dims[0]}..{dims[-1]}), {table.rows[0]}..{table.rows[-1]} rows, "
            f"x{table.scale:.2f} live up to {SPLIT_ROWS} rows (larger calls' own scale is in their times)")
