"""A light probe of this machine's speed, run beside a measurement (sim_fidelity.py).

This VM's speed drifts within seconds (benchmarks/RESULTS.md, "Simulator fidelity"): a profile fitted a
minute before a run can describe a different machine from the one the run gets. The probe measures the
machine during both: every `interval` seconds it times (thread CPU time) one fixed pass of the kinds of work
an engine step does: a decode-like F.linear of 4 rows over 16 MB of fp32 weights, 200 small torch ops
(F.linear 4x64 by 64x64, SiLU, a sum) and a pure-Python loop, about 8 ms in all (0.8% of a core at the
default 1 s), and records each part. The ratio of its mean during a run to its mean during the calibration
that fitted the profile is how much slower the run's machine was.

The drift is per virtual CPU (2026-11-26, 2-core AMD EPYC VM, a worker running small torch ops and a Python
loop without pause for 90 s, probes beside it, 5-s windows): the worker's speed varied with a coefficient
of variation of 13% (up to 1.6x between windows), and worker / probe (each over its mean) by 4% with the
probe pinned to the worker's CPU (correlation 0.95-0.97); a probe on the other CPU did not follow it
(correlation -0.64 to -0.15). Memory streaming drifts less (9%) and is seen from either CPU. So run the
probe on the measured process's CPU: sim_fidelity.py pins itself, its children and the probe to one CPU.

    python benchmarks/speed_probe.py --out FILE [--interval 1]  # until SIGTERM; FILE: [[unix time, ms x 3], ...]
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import fmean

PARTS = ("stream", "torch_ops", "python")


def probe(out: Path, interval: float) -> None:
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    big = [torch.randn(1024, 1024, generator=g) for _ in range(4)]
    small = [torch.randn(64, 64, generator=g) for _ in range(50)]
    x, xs = torch.randn(4, 1024, generator=g), torch.randn(4, 64, generator=g)

    def stream() -> None:
        for w in big:
            F.linear(x, w)

    def torch_ops() -> None:
        for w in small:
            y = F.linear(xs, w)
            (F.silu(y) * y).sum(-1)

    def python() -> None:
        d: dict = {}
        for i in range(20000):
            d[i % 97] = d.get(i % 97, 0) + i

    samples: list = []
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    for _ in range(3):  # warm-up: first touches, allocator
        stream(), torch_ops(), python()
    out.with_name(out.name + ".ready").touch()
    while not stop:
        row = [time.time()]
        for part in (stream, torch_ops, python):
            t0 = time.thread_time()
            part()
            row.append((time.thread_time() - t0) * 1e3)
        samples.append(row)
        time.sleep(interval)
    out.write_text(json.dumps({"cpu_s": time.process_time(), "samples": samples}))


class SpeedProbe:
    """`with SpeedProbe() as p: ...` runs the probe in a child process meanwhile (on the CPUs this process
    may use); then `p.samples` holds [unix time, ms per part...] rows, `p.mean_ms` the mean time of a whole
    pass (None when the block was too short for a sample), `p.parts_ms` each part's, and `p.cpu_s` the
    CPU seconds the probe used."""

    def __init__(self, interval: float = 1.0):
        self.interval, self.samples, self.cpu_s = interval, [], 0.0

    def __enter__(self) -> "SpeedProbe":
        self._dir = tempfile.TemporaryDirectory(prefix="speed-probe-")
        self._out = Path(self._dir.name) / "samples.json"
        self._proc = subprocess.Popen([sys.executable, __file__, "--out", str(self._out),
                                       "--interval", str(self.interval)], env={**os.environ, "OMP_NUM_THREADS": "1"})
        return self

    def __exit__(self, *exc) -> None:
        self._proc.send_signal(signal.SIGTERM)
        self._proc.wait(60)
        if self._out.is_file():
            data = json.loads(self._out.read_text())
            self.samples, self.cpu_s = data["samples"], data["cpu_s"]
        self._dir.cleanup()

    def wait_ready(self, timeout_s: float = 120.0) -> bool:
        """Wait until the probe has started sampling (torch imported, weights made); False on timeout."""
        ready, deadline = self._out.with_name(self._out.name + ".ready"), time.monotonic() + timeout_s
        while not ready.exists() and time.monotonic() < deadline and self._proc.poll() is None:
            time.sleep(0.05)
        return ready.exists()

    @property
    def mean_ms(self):
        return fmean(sum(row[1:]) for row in self.samples) if self.samples else None

    @property
    def parts_ms(self) -> dict:
        return {part: fmean(row[i] for row in self.samples) for i, part in enumerate(PARTS, 1)} if self.samples else {}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--interval", type=float, default=1.0)
    args = p.parse_args()
    probe(args.out, args.interval)


if __name__ == "__main__":
    main()
