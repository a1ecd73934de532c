"""`planc profile`: measure this machine's CPU as a DeviceProfile for the cost model and simulator.

Three microbenchmarks on one thread (the runtime serves with one intra-op thread): fp32 matmul
FLOP/s on a large product (the peak, so matmul_efficiency is 1.0), memory bandwidth of a large
copy, and the rate at which a one-row matmul streams a weight matrix too large for the caches (that
rate over the copy bandwidth is bw_efficiency: decode reads weights that way). Then the runtime's
fixed overheads are fitted on steps of planc's own engine (`planc.profile_calibrate`).

>>> profile = measure_local(quick=True)          # doctest: +SKIP
>>> write_profile(profile, "local-profile.yaml")  # doctest: +SKIP
"""
from __future__ import annotations

import datetime
import os
import platform
import socket
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional, Union

import torch
import yaml

from planc.cluster import DeviceProfile
from planc.profile_calibrate import calibration_bundle, fit_overheads, with_threads


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
    """Measure this machine (about 20 s; `quick` about 8 s, for tests) on one thread, as the runtime runs."""
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
    say("building the calibration model")
    with tempfile.TemporaryDirectory(prefix="planc-profile-") as tmp:
        from planc.bundle import Bundle

        bundle = Bundle.open(calibration_bundle(Path(tmp)))
        fit = fit_overheads(device, bundle, quick, say)
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    source = (f"`planc profile{' --quick' if quick else ''}` on {socket.gethostname()} ({cpu_name()}, "
              f"{os.cpu_count()} cores, torch {torch.__version__}, 1 thread) at {when}; overheads fitted on "
              f"{fit.num_steps} engine step kinds, median step error {100 * fit.rel_error:.1f}%")
    return device.model_copy(update={"overheads": fit.overheads, "source": source})


def write_profile(profile: DeviceProfile, path: Union[str, Path]) -> Path:
    """Write `profile` as YAML (creating the directory; replaced atomically) and return the path."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(yaml.safe_dump(profile.model_dump(mode="json"), sort_keys=False), encoding="utf-8")
    os.replace(tmp, path)
    return path


def profile_rows(profile: DeviceProfile) -> list[tuple[str, str]]:
    """(figure, value) pairs for the CLI's table."""
    ov = profile.overheads
    return [("matmul (fp32, 1 thread)", f"{profile.peak_tflops['fp32'] * 1e3:.1f} GFLOP/s"),
            ("memory bandwidth (copy)", f"{profile.mem_bw_gbps:.1f} GB/s"),
            ("weight streaming (1-row matmul)", f"{profile.mem_bw_gbps * profile.bw_efficiency:.1f} GB/s "
                                                f"(bw_efficiency {profile.bw_efficiency:.2f})"),
            ("per step", f"{ov.step_us:.0f} us"), ("per block call (or own attention call)", f"{ov.block_call_us:.1f} us"),
            ("per sequence in a block call", f"{ov.per_seq_us:.1f} us"), ("memory", f"{profile.memory_gb:g} GB")]
