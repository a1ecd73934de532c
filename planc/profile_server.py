"""Measure what `planc serve` itself costs per request and per streamed token (the simulator's server term).

`planc serve` steps the engine in one thread and runs the HTTP server (uvicorn's asyncio loop) in the
main thread. For every token the main thread takes the engine's event off a queue, detokenizes,
builds a JSON chunk and writes a server-sent event; for every request it parses the body, sets up the
response and updates metrics. All of that is Python holding the GIL, which the engine thread needs
for its own Python work, so the simulator charges it there (`planc.simulate`).

Here `planc serve` runs the calibration bundle in a child process (127.0.0.1, one engine thread), this
process streams requests to it (token-id prompts, ignore_eos) in two rounds that differ only in
output length, and the main thread's CPU time is read from Linux's /proc before and after each
round. Two rounds give two equations: CPU = requests * per_request + tokens * per_token.

That CPU is not what the server costs the engine. On a real server the engine thread lost ~0.4 ms
per streamed token on the calibration model while the server thread used ~0.1 ms (its own CPU grew
and it waited: the GIL, which the engine retakes after every torch op, and the wake-ups of a
second busy thread). So each round also runs, right after the HTTP one, on an engine in this
process with the same requests, concurrency and settings (no server), and the difference of the two
rounds' wall times is the engine's loss. The server wakes once per step to stream that step's tokens,
so the loss has a part per step and a part per token: at concurrency 1 a step streams one token, at 6
about six. The rounds come in pairs at two concurrencies (short and long outputs); each pair's long
minus short round has no per-request part, and the two pairs' differences give two equations in the
per-step and per-token parts (`fit_toll`); the short round at the higher concurrency then gives the
per-request part. On the Intel host of 2026-11-27 the loss was ~290-370 us per step and ~10-25 us per
token (benchmarks/RESULTS.md): mostly per step, which a per-token figure alone charged too little to
small batches and too much to large ones.

>>> cost = measure_server(bundle_dir)  # doctest: +SKIP
>>> cost.token_us, cost.engine_step_us, cost.engine_token_us  # doctest: +SKIP
"""
from __future__ import annotations

import asyncio
import json
import statistics
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

ROUNDS = ((6, 32, 4), (6, 32, 64), (1, 12, 4), (1, 12, 64))
"""(concurrency, requests, output tokens each) per round: a pair of rounds, short and long outputs, at each
of two concurrencies; the higher first. Rounds of 16 and 128 tokens gave the same per-token server CPU
within 5% here: it does not grow with the output."""
ROUNDS_QUICK = ((6, 8, 4), (6, 8, 32), (1, 4, 4), (1, 4, 32))
REPEATS = 5


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
class Round:
    """One round of `measure_server`: what it sent and what it took."""

    concurrency: int
    requests: int
    tokens: int
    """Output tokens of each request."""
    steps: int
    """Engine steps the in-process run took (the HTTP run's are the same requests at the same concurrency)."""
    server_cpu_s: float
    http_s: float
    alone_s: float

    @property
    def loss_s(self) -> float:
        """Wall time planc serve took beyond the engine alone."""
        return self.http_s - self.alone_s


PROMPT_TOKENS = 24


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
    """What planc serve costs on the bundle at `bundle_dir`: its main thread's CPU per request and token,
    and the wall time the engine loses to it per request, token and step.

    Each round runs over HTTP and then, right after, on the in-process engine, and the rounds are
    repeated REPEATS times; every figure is the median of the repeats' fits. This VM's speed drifted by
    10-60% within a minute on its earlier host (the same in-process round took 6.2 s and 9.9 s three
    minutes apart), so all HTTP rounds first and then all in-process ones measured the drift as much as
    the server. The concurrency-6 pair is the noisy one: two measurements a minute apart with 5 repeats
    gave 316 and 345 us per step, 85 and 60 us per token.

    Needs Linux (/proc) and a free port on 127.0.0.1; about 40 s on the calibration bundle (`quick` 8 s)."""
    from planc.bench.server import LocalServer

    say = progress or (lambda _msg: None)
    server = LocalServer(bundle_dir, "--threads 1 --kv-cache-mb 32", env={"OMP_NUM_THREADS": "1"})
    rounds = ROUNDS_QUICK if quick else ROUNDS
    fits = []
    engine, steps = _in_process(bundle_dir)
    with server as url, engine.in_thread():
        pid = server.proc.pid  # `python -m planc.cli serve`, whose main thread runs the asyncio loop
        asyncio.run(_round(url, 4, 2, 4))  # warm-up: first requests pay imports and code paths
        _engine_round(engine, 4, 2, 4)
        for repeat in range(1 if quick else REPEATS):
            measured = []
            for i, (concurrency, requests, tokens) in enumerate(rounds):
                say(f"server cost, round {i + 1} of {len(rounds)}, repeat {repeat + 1}")
                before, start = thread_cpu_s(pid), time.perf_counter()
                asyncio.run(_round(url, requests, tokens, concurrency))
                http = time.perf_counter() - start
                cpu = thread_cpu_s(pid) - before
                steps_before, start = steps.count, time.perf_counter()
                _engine_round(engine, requests, tokens, concurrency)
                measured.append(Round(concurrency, requests, tokens, steps.count - steps_before, cpu, http,
                                      time.perf_counter() - start))
            fits.append(fit_server(rounds[:2], [r.server_cpu_s for r in measured[:2]]) + fit_toll(measured))
    return ServerCost(*(float(statistics.median(f[i] for f in fits)) for i in range(5)))


def _in_process(bundle_dir: Path):
    """planc's engine on `bundle_dir` with planc serve's settings (no server), to run in this process, and
    the counter of its steps."""
    from planc.bundle import Bundle
    from planc.runtime.engine import Engine, StepStats
    from planc.runtime.server import ServeOptions, engine_config

    bundle = Bundle.open(bundle_dir)
    steps = _StepCounter(next(iter(bundle.variants.values()))["chain"][0]["block"])
    return Engine(bundle, engine_config(bundle, ServeOptions(kv_cache_mb=32, threads=1)), StepStats(on_batch=steps)), steps


class _StepCounter:
    """Counts the engine's forward steps as the batched calls of the chain's first block: one per step on the
    calibration bundle (one variant, batches far below the cap)."""

    def __init__(self, first_block: str):
        self.first_block, self.count = first_block, 0

    def __call__(self, block: str, batch: int, variants: int) -> None:
        if block == self.first_block:
            self.count += 1


def _engine_round(engine, requests: int, tokens: int, concurrency: int) -> None:
    from planc.runtime.sampling import SamplingParams

    gate, done = threading.Semaphore(concurrency), threading.Semaphore(0)

    def sink(event) -> None:
        if event.finished:
            gate.release()
            done.release()
    for i in range(requests):
        gate.acquire()
        engine.submit("base", _prompt(i), SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True), sink)
    for _ in range(requests):
        done.acquire()


def _prompt(i: int) -> list[int]:
    return [3 + (i * 7 + k) % 250 for k in range(PROMPT_TOKENS)]


def fit_server(rounds: Sequence[tuple[int, int, int]], cpu_s: Sequence[float]) -> tuple[float, float]:
    """Solve CPU = requests * a + requests * tokens * b for (a, b) in microseconds, neither below 0, from two
    rounds (concurrency, requests, tokens) that differ in tokens.

    >>> fit_server(((6, 10, 4), (6, 10, 64)), [10 * (500e-6 + 4 * 100e-6), 10 * (500e-6 + 64 * 100e-6)])
    (500.0, 100.0)
    """
    (_, n1, t1), (_, n2, t2) = rounds
    per_token = max(0.0, (cpu_s[1] / n2 - cpu_s[0] / n1) / (t2 - t1))
    per_request = max(0.0, cpu_s[0] / n1 - t1 * per_token)
    return round(per_request * 1e6, 1), round(per_token * 1e6, 1)


def fit_toll(rounds: Sequence[Round]) -> tuple[float, float, float]:
    """The engine's loss per request, per token and per step, in microseconds, none below 0, from two pairs of
    rounds (short, long outputs; each pair at one concurrency): loss = requests*a + tokens*b + steps*c.

    A pair's long minus short round has no per-request part, so the two differences fix b and c. Where either
    comes out below 0 (noise), one term alone is kept: b or c, whichever least-squares fit of both differences
    leaves the smaller residual. The first round then fixes a.

    >>> def rnd(c, n, t, steps, a=3000e-6, b=20e-6, s=300e-6):
    ...     return Round(c, n, t, steps, 0.0, n * a + n * t * b + steps * s, 0.0)
    >>> fit_toll([rnd(6, 32, 4, 24), rnd(6, 32, 64, 344), rnd(1, 12, 4, 48), rnd(1, 12, 64, 768)])
    (3000.0, 20.0, 300.0)
    >>> fit_toll([rnd(6, 32, 4, 24, s=0), rnd(6, 32, 64, 344, s=0), rnd(1, 12, 4, 48, s=0), rnd(1, 12, 64, 768, s=0)])
    (3000.0, 20.0, 0.0)
    >>> fit_toll([rnd(6, 32, 4, 24, b=0), rnd(6, 32, 64, 300, b=0), rnd(1, 12, 4, 48, b=0), rnd(1, 12, 64, 768, b=0)])
    (3000.0, 0.0, 300.0)
    """
    first, *_ = rounds
    diffs = [(long.steps - short.steps, long.requests * long.tokens - short.requests * short.tokens,
              long.loss_s - short.loss_s) for short, long in (rounds[0:2], rounds[2:4])]
    (s1, t1, l1), (s2, t2, l2) = diffs
    det = s1 * t2 - s2 * t1
    per_step = (l1 * t2 - l2 * t1) / det if det else -1.0
    per_token = (s1 * l2 - s2 * l1) / det if det else -1.0
    if per_step < 0 or per_token < 0:  # one term alone: keep the one whose fit leaves the smaller residual
        alone = [_one_term([d[i] for d in diffs], [d[2] for d in diffs]) for i in (0, 1)]
        per_step, per_token = ((alone[0][0], 0.0) if alone[0][1] <= alone[1][1] else (0.0, alone[1][0]))
    per_request = max(0.0, (first.loss_s - first.steps * per_step - first.requests * first.tokens * per_token)
                      / first.requests)
    return tuple(round(max(0.0, x) * 1e6, 1) for x in (per_request, per_token, per_step))


def _one_term(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """Least squares y = k * x with k >= 0: (k, the residual sum of squares)."""
    k = max(0.0, sum(a * b for a, b in zip(x, y)) / (sum(a * a for a in x) or 1.0))
    return k, sum((b - k * a) ** 2 for a, b in zip(x, y))


async def _round(url: str, requests: int, tokens: int, concurrency: int) -> None:
    import httpx

    gate = asyncio.Semaphore(concurrency)
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
