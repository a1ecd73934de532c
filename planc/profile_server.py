"""Measure what `planc serve` itself costs per request and per streamed token (the simulator's server term).

`planc serve` steps the engine in one thread and runs the HTTP server (uvicorn's asyncio loop) in the
main thread. For every token the main thread takes the engine's event off a queue, detokenizes,
builds a JSON chunk and writes a server-sent event; for every request it parses the body, sets up the
response and updates metrics. All of that is Python holding the GIL, which the engine thread needs
for its own Python work, so the simulator charges it there (`planc.simulate`).

Two measurements on a bundle (`planc profile` uses the tiny example: `planc.profile.example_bundle`), both
on 127.0.0.1:

- **The server thread's CPU** (server_request_us, server_token_us: how late a request reaches the engine
  and a token the client). `planc serve` runs in a child process; this process streams requests to it
  (token-id prompts, ignore_eos) in two rounds that differ only in output length, and the main thread's
  CPU time is read from Linux's /proc before and after each round: CPU = requests * per_request +
  tokens * per_token.
- **What the server costs the engine thread** (engine_step_us, engine_token_us, engine_request_us). That
  is far more than the server's CPU: the GIL, which the engine retakes after every torch op, and the
  wake-ups of a second busy thread (and of the client, where they share a core). `planc serve`'s state
  and HTTP server run in this process with every engine step timed: its wall time and the engine
  thread's own CPU time, whose difference is the time the engine thread could not run. `planc bench`'s
  load generator drives it from a child process with an open-loop Gamma workload (bursty, mixed
  lengths, as real traffic is), and that difference, over back-to-back steps, is fitted on one per
  step, the tokens the step before sampled (the server streams them during this one) and the requests
  submitted during the step (`fit_step_toll`).

The second replaced (session 12) the difference of two wall times: planc serve's rounds minus the same
rounds on an engine alone, fitted on closed-loop rounds at concurrency 1 and 6. That was noisy (two
measurements a minute apart: 316 and 345 us per step, 85 and 60 us per token) and could not tell per step
from per token without rounds at two concurrencies. Timed steps show both at once: on the tiny example,
pinned to one core, ~240-300 us per step and ~220 us per token; on the calibration bundle ~140-190 us and
~140 us (benchmarks/RESULTS.md: the loss depends on the model served, by up to 1.5x here).

>>> cost = measure_server(bundle_dir)  # doctest: +SKIP
>>> cost.token_us, cost.engine_step_us, cost.engine_token_us  # doctest: +SKIP
"""
from __future__ import annotations

import asyncio
import json
import os
import statistics
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

ROUNDS = ((32, 4), (32, 64))
"""(requests, output tokens each) per round of the server-CPU measurement: the same requests, short and long
outputs. Rounds of 16 and 128 tokens gave the same per-token cost within 5% here: it does not grow with the
output."""
ROUNDS_QUICK = ((8, 4), (8, 32))
REPEATS = 3
CONCURRENCY = 6
TOLL_WORKLOAD = {"kind": "gamma", "rate": 5.0, "cv": 1.5, "seed": 7,
                 "prompt_tokens": {"dist": "uniform", "low": 8, "high": 128},
                 "output_tokens": {"dist": "uniform", "low": 8, "high": 128}}
"""The open-loop traffic the engine's loss is measured under: batches of one to a dozen sequences on the tiny
example, mostly a few (its steps take a few ms). Not the fidelity benchmark's workload."""
TOLL_REQUESTS, TOLL_REQUESTS_QUICK = 160, 40
WARMUP = 4
"""Untimed requests the load generator sends first (their steps are left out of the fit)."""
PROMPT_TOKENS = 24


@dataclass(frozen=True)
class ServerCost:
    """Microseconds per request and per streamed token of the server thread's CPU, and the engine's loss per
    request, per streamed token and per step that streams tokens."""

    request_us: float
    token_us: float
    engine_request_us: float
    engine_token_us: float
    engine_step_us: float


@dataclass(frozen=True)
class TimedStep:
    """One engine step that sampled, as `measure_toll` sees it."""

    start: float
    """perf_counter at its start."""
    wall_s: float
    cpu_s: float
    """The engine thread's own CPU time during the step."""
    sampled: int
    """Tokens the step sampled (the server streams them during the next step)."""
    submitted: int
    """Requests the server submitted to the engine during the step (it parsed them meanwhile)."""


def thread_cpu_s(pid: int, tid: Optional[int] = None) -> float:
    """CPU seconds of one thread of process `pid` (default its main thread): the scheduler's nanosecond
    run time where the kernel keeps it, else the 10 ms-tick user + system time."""
    task = Path(f"/proc/{pid}/task/{tid or pid}")
    try:
        return int((task / "schedstat").read_text().split()[0]) * 1e-9
    except (OSError, ValueError, IndexError):
        fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / 100.0


def measure_server(bundle_dir: Path, quick: bool = False,
                   progress: Optional[Callable[[str], None]] = None) -> ServerCost:
    """What planc serve costs on the bundle at `bundle_dir`: its main thread's CPU per request and token
    (`server_cpu`), and the time the engine thread loses to it per request, token and step (`measure_toll`).

    Needs Linux (/proc) and free ports on 127.0.0.1; about 50 s on the tiny example (`quick` 15 s)."""
    request_us, token_us = server_cpu(bundle_dir, quick, progress)
    return ServerCost(request_us, token_us, *measure_toll(bundle_dir, quick, progress))


def server_cpu(bundle_dir: Path, quick: bool = False,
               progress: Optional[Callable[[str], None]] = None) -> tuple[float, float]:
    """planc serve's main-thread CPU per request and per streamed token, in microseconds: ROUNDS against a
    child `planc serve`, repeated REPEATS times, the median of the repeats' fits."""
    from planc.bench.server import LocalServer

    say = progress or (lambda _msg: None)
    rounds = ROUNDS_QUICK if quick else ROUNDS
    fits = []
    server = LocalServer(bundle_dir, "--threads 1 --kv-cache-mb 32", env={"OMP_NUM_THREADS": "1"})
    with server as url:
        pid = server.proc.pid  # `python -m planc.cli serve`, whose main thread runs the asyncio loop
        asyncio.run(_round(url, 4, 2))  # warm-up: first requests pay imports and code paths
        for repeat in range(1 if quick else REPEATS):
            cpu = []
            for i, (requests, tokens) in enumerate(rounds):
                say(f"server CPU, round {i + 1} of {len(rounds)}, repeat {repeat + 1}")
                before = thread_cpu_s(pid)
                asyncio.run(_round(url, requests, tokens))
                cpu.append(thread_cpu_s(pid) - before)
            fits.append(fit_server(rounds, cpu))
    return tuple(float(statistics.median(f[i] for f in fits)) for i in range(2))


def fit_server(rounds: Sequence[tuple[int, int]], cpu_s: Sequence[float]) -> tuple[float, float]:
    """Solve CPU = requests * a + requests * tokens * b for (a, b) in microseconds, neither below 0, from two
    rounds (requests, tokens) that differ in tokens.

    >>> fit_server(((10, 4), (10, 64)), [10 * (500e-6 + 4 * 100e-6), 10 * (500e-6 + 64 * 100e-6)])
    (500.0, 100.0)
    """
    (n1, t1), (n2, t2) = rounds
    per_token = max(0.0, (cpu_s[1] / n2 - cpu_s[0] / n1) / (t2 - t1))
    per_request = max(0.0, cpu_s[0] / n1 - t1 * per_token)
    return round(per_request * 1e6, 1), round(per_token * 1e6, 1)


def measure_toll(bundle_dir: Path, quick: bool = False,
                 progress: Optional[Callable[[str], None]] = None) -> tuple[float, float, float]:
    """The time planc serve's engine thread loses to the server, in microseconds per request, per streamed
    token and per step that streams: the server built as `planc serve` builds it, in this process, every
    engine step timed, and `planc bench`'s load generator in a child process sending TOLL_WORKLOAD
    (`fit_step_toll`)."""
    import socket
    import subprocess
    import sys

    import uvicorn

    from planc.bench.server import wait_healthy
    from planc.bundle import Bundle
    from planc.runtime.server import ServeOptions, build_app, build_state

    say = progress or (lambda _msg: None)
    state = build_state(Bundle.open(bundle_dir), ServeOptions(kv_cache_mb=32, threads=1))
    timer = _StepTimer(state.engine)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(build_app(state), log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="planc-profile-server", daemon=True)
    thread.start()
    n = TOLL_REQUESTS_QUICK if quick else TOLL_REQUESTS
    try:
        if not wait_healthy(url, time.monotonic() + 60):
            raise RuntimeError(f"the in-process planc serve at {url} did not answer /health")
        say(f"the engine's loss to planc serve: {n} requests")
        code = f"from planc.profile_server import _send_load; _send_load({url!r}, {n})"
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
        if run.returncode != 0:
            raise RuntimeError(f"the load for planc serve failed: {(run.stderr or run.stdout).strip()[-300:]}")
    finally:
        server.should_exit = True  # its lifespan stops and joins the engine thread
        thread.join(15)
        sock.close()
    # the warm-up requests' steps pay first calls: left out (they come one at a time, before the timed ones)
    timed_from = timer.submit_times[WARMUP] if len(timer.submit_times) > WARMUP else 0.0
    steps = [step for step in timer.steps if step.start >= timed_from]
    if len(steps) < 20:
        raise RuntimeError(f"the engine's loss to planc serve: only {len(steps)} timed steps to fit")
    return fit_step_toll(steps)


def _send_load(url: str, num_requests: int) -> None:
    """`planc bench`'s open-loop load generator sending TOLL_WORKLOAD to `url` (run in a child process, so that
    the client is not a thread of the server's process), after WARMUP untimed requests; exits non-zero unless
    every request completed."""
    from planc.bench.config import make_config
    from planc.bench.run import BenchPlan, run_bench
    from planc.workload import GammaWorkload

    config = make_config(url=url, mode="open", max_requests=num_requests, duration_s=600, request_timeout_s=120,
                         prompt="ids", token_id_range=(3, 250), ignore_eos=True, warmup=WARMUP,
                         label="planc profile", scrape_metrics=False)
    result = run_bench(BenchPlan(config, workload=GammaWorkload(**TOLL_WORKLOAD, num_requests=num_requests)))
    if result["counts"]["completed"] != num_requests:
        errors = sorted({r.get("error") for r in result["requests"] if r.get("error")})
        raise SystemExit(f"{result['counts']['completed']} of {num_requests} requests completed: {errors[:2]}")


def fit_step_toll(steps: Sequence[TimedStep], back_to_back_s: float = 0.002) -> tuple[float, float, float]:
    """(per request, per token, per step) in microseconds, none below 0: least squares of each step's wall minus
    CPU time on the requests submitted during it, the tokens the step before sampled, and one. Only steps
    that follow one that sampled within `back_to_back_s`: the server's work done while the engine idles costs
    it nothing (the simulator forgives it so).

    >>> import random
    >>> rng, steps, t = random.Random(0), [], 0.0
    >>> for i in range(400):
    ...     sub, prev = rng.randint(0, 1), steps[-1].sampled if steps else 0
    ...     loss = (300 + 150 * prev + 2000 * sub) * 1e-6 if prev else 0.0
    ...     steps.append(TimedStep(t, 0.004 + loss, 0.004, rng.randint(1, 6), sub))
    ...     t += 0.004 + loss
    >>> fit_step_toll(steps)
    (2000.0, 150.0, 300.0)
    """
    import numpy as np

    from planc.profile_calibrate import _nonnegative_lstsq

    rows, loss = [], []
    for before, step in zip(steps, steps[1:]):
        if before.sampled and step.start - (before.start + before.wall_s) <= back_to_back_s:
            rows.append((step.submitted, before.sampled, 1.0))
            loss.append(step.wall_s - step.cpu_s)
    if len(rows) < 3:
        return 0.0, 0.0, 0.0
    coef = _nonnegative_lstsq(np.asarray(rows, dtype=float), np.asarray(loss))
    return tuple(round(float(c) * 1e6, 1) for c in coef)


class _StepTimer:
    """Times every step of `engine` that samples (wall and the engine thread's CPU) and counts the requests
    submitted during it, by wrapping the instance's step, _sample and submit (the runtime is not changed)."""

    def __init__(self, engine):
        self.steps: list[TimedStep] = []
        self.submit_times: list[float] = []
        self._sampled, self._submitted = 0, 0
        step, sample, submit = engine.step, engine._sample, engine.submit

        def timed_step():
            self._sampled = 0
            submitted, start, cpu = self._submitted, time.perf_counter(), time.thread_time()
            busy = step()
            if self._sampled:
                self.steps.append(TimedStep(start, time.perf_counter() - start, time.thread_time() - cpu,
                                            self._sampled, self._submitted - submitted))
            return busy

        def counted_sample(work, logits):
            before = sum(len(seq.output_ids) for seq in work)  # a prompt chunk in `logits` samples nothing
            out = sample(work, logits)
            self._sampled += sum(len(seq.output_ids) for seq in work) - before
            return out

        def counted_submit(*args, **kwargs):
            self._submitted += 1
            self.submit_times.append(time.perf_counter())
            return submit(*args, **kwargs)

        engine.step, engine._sample, engine.submit = timed_step, counted_sample, counted_submit


def _prompt(i: int) -> list[int]:
    return [3 + (i * 7 + k) % 250 for k in range(PROMPT_TOKENS)]


async def _round(url: str, requests: int, tokens: int) -> None:
    import httpx

    gate = asyncio.Semaphore(CONCURRENCY)
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        async def one(i: int) -> None:
            async with gate:
                await _stream(client, i, tokens)
        await asyncio.gather(*(one(i) for i in range(requests)))


async def _stream(client, i: int, tokens: int) -> None:
    body = {"model": "base", "prompt": _prompt(i), "max_tokens": tokens,
            "temperature": 0.0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    usage = None
    async with client.stream("POST", "/v1/completions", json=body) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"planc serve answered {resp.status_code}: {(await resp.aread())[:200]!r}")
        async for line in resp.aiter_lines():
            if line.startswith("data: {"):
                usage = json.loads(line[6:]).get("usage") or usage
    if not usage or usage["completion_tokens"] != tokens:
        raise RuntimeError(f"planc serve streamed {usage and usage['completion_tokens']} of {tokens} tokens")
