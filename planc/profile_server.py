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
rounds' wall times is fitted the same way: engine_request_us and engine_token_us. That difference is
noisy here: at concurrency 1 and 3 two repeats of the experiment gave 243 and 0, and 973 and 0 us per
token; at 6 (what the rounds use) 376 and 382. Whether it is a cost per token or per step (one
wake-up of the server per step's burst of tokens) those figures cannot tell (benchmarks/RESULTS.md).

>>> cost = measure_server(bundle_dir)  # doctest: +SKIP
>>> cost.token_us, cost.engine_token_us  # doctest: +SKIP
"""
from __future__ import annotations

import asyncio
import json
import statistics
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

ROUNDS = ((32, 4), (32, 64))
"""(requests, output tokens each) per round: the same requests, short and long outputs. Rounds of 16
and 128 tokens gave the same per-token cost within 5% here: it does not grow with the output."""
ROUNDS_QUICK = ((8, 4), (8, 32))
REPEATS = 3
CONCURRENCY = 6


@dataclass(frozen=True)
class ServerCost:
    """Microseconds per request and per streamed token: the server thread's CPU, and the engine's loss."""

    request_us: float
    token_us: float
    engine_request_us: float
    engine_token_us: float
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
    and the wall time the engine loses to it per request and token.

    Each round runs over HTTP and then, right after, on the in-process engine, and the rounds are
    repeated REPEATS times; every figure is the median of the repeats' fits. This VM's speed drifts by
    10-60% within a minute (the same in-process round took 6.2 s and 9.9 s three minutes apart), so all
    HTTP rounds first and then all in-process ones, as before, measured the drift as much as the server.

    Needs Linux (/proc) and a free port on 127.0.0.1; about 40 s on the calibration bundle (`quick` 8 s)."""
    from planc.bench.server import LocalServer

    say = progress or (lambda _msg: None)
    server = LocalServer(bundle_dir, "--threads 1 --kv-cache-mb 32", env={"OMP_NUM_THREADS": "1"})
    rounds = ROUNDS_QUICK if quick else ROUNDS
    fits = []
    with server as url, _in_process(bundle_dir).in_thread() as engine:
        pid = server.proc.pid  # `python -m planc.cli serve`, whose main thread runs the asyncio loop
        asyncio.run(_round(url, 4, 2))  # warm-up: first requests pay imports and code paths
        _engine_round(engine, 4, 2)
        for repeat in range(1 if quick else REPEATS):
            cpu, http, alone = [], [], []
            for i, (requests, tokens) in enumerate(rounds):
                say(f"server cost, round {i + 1} of {len(rounds)}, repeat {repeat + 1}")
                before, start = thread_cpu_s(pid), time.perf_counter()
                asyncio.run(_round(url, requests, tokens))
                http.append(time.perf_counter() - start)
                cpu.append(thread_cpu_s(pid) - before)
                start = time.perf_counter()
                _engine_round(engine, requests, tokens)
                alone.append(time.perf_counter() - start)
            fits.append(fit_server(rounds, cpu) + fit_server(rounds, [h - a for h, a in zip(http, alone)]))
    return ServerCost(*(float(statistics.median(f[i] for f in fits)) for i in range(4)))


def _in_process(bundle_dir: Path):
    """planc's engine on `bundle_dir` with planc serve's settings (no server): to run in this process."""
    from planc.bundle import Bundle
    from planc.runtime.engine import Engine
    from planc.runtime.server import ServeOptions, engine_config

    bundle = Bundle.open(bundle_dir)
    return Engine(bundle, engine_config(bundle, ServeOptions(kv_cache_mb=32, threads=1)))


def _engine_round(engine, requests: int, tokens: int) -> None:
    from planc.runtime.sampling import SamplingParams

    gate, done = threading.Semaphore(CONCURRENCY), threading.Semaphore(0)

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


def fit_server(rounds: tuple[tuple[int, int], ...], cpu_s: list[float]) -> tuple[float, float]:
    """Solve CPU = requests * a + requests * tokens * b for (a, b) in microseconds, neither below 0.

    >>> fit_server(((10, 4), (10, 64)), [10 * (500e-6 + 4 * 100e-6), 10 * (500e-6 + 64 * 100e-6)])
    (500.0, 100.0)
    """
    (n1, t1), (n2, t2) = rounds
    per_token = max(0.0, (cpu_s[1] / n2 - cpu_s[0] / n1) / (t2 - t1))
    per_request = max(0.0, cpu_s[0] / n1 - t1 * per_token)
    return round(per_request * 1e6, 1), round(per_token * 1e6, 1)


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
