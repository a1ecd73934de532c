"""The load generator: open loop (each request at its arrival time) or closed loop (N clients, each
sending its next request when its last one ends), with a timeline of what is in flight.

Bounds: no request starts after `duration_s`, at most `max_requests` are taken from the workload
(the caller cuts the list), and each request has its own timeout, so `run_load` returns at most
`duration_s + request_timeout_s` after it starts.
"""
from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import httpx

from planc.bench.client import Job, send
from planc.bench.config import BenchConfig
from planc.bench.result import RequestRecord

# Prometheus gauges of the server's own queue: planc's and vLLM's names
QUEUE_GAUGES = {"waiting": ("planc_requests_waiting", "vllm:num_requests_waiting"),
                "running": ("planc_requests_running", "vllm:num_requests_running")}


@dataclass
class LoadState:
    """Live counts, read by the timeline sampler and the progress display."""

    pending: int = 0
    """Due (open loop) but waiting in the client for a free connection."""
    in_flight: int = 0
    sent: int = 0
    completed: int = 0
    failed: int = 0


@dataclass
class Timeline:
    interval_s: float
    t_s: list[float] = field(default_factory=list)
    in_flight: list[int] = field(default_factory=list)
    pending: list[int] = field(default_factory=list)
    server_waiting: Optional[list[float]] = None
    server_running: Optional[list[float]] = None

    def to_json(self) -> dict:
        return {"interval_s": self.interval_s, "t_s": [round(t, 4) for t in self.t_s], "in_flight": self.in_flight,
                "pending": self.pending, "server_waiting": self.server_waiting, "server_running": self.server_running}


@dataclass
class LoadRun:
    records: list[RequestRecord]
    timeline: Timeline
    not_sent: int


def parse_queue(metrics_text: str) -> Optional[dict[str, float]]:
    """The server's waiting/running gauges from a Prometheus page, or None if it exports neither."""
    found: dict[str, float] = {}
    for line in metrics_text.splitlines():
        if line.startswith("#"):
            continue
        for key, names in QUEUE_GAUGES.items():
            name = line.split("{", 1)[0].split(" ", 1)[0]
            if name in names:
                try:
                    found[key] = found.get(key, 0.0) + float(line.rsplit(" ", 1)[1])
                except (IndexError, ValueError):
                    pass
    return found or None


async def _sample(config: BenchConfig, state: LoadState, timeline: Timeline, t0: float, stop: asyncio.Event,
                  scrape: Optional[httpx.AsyncClient]) -> None:
    interval = config.sample_interval_s
    last_scrape = -math.inf
    while not stop.is_set():
        now = time.perf_counter() - t0
        timeline.t_s.append(now)
        timeline.in_flight.append(state.in_flight)
        timeline.pending.append(state.pending)
        if scrape is not None:
            queue = None  # between scrapes: a gap in the server's series, not a repeated value
            if now - last_scrape >= config.scrape_interval_s - 1e-9:
                last_scrape = now
                queue = await _scrape(scrape, config.url)
            for key in ("waiting", "running"):
                series = getattr(timeline, f"server_{key}")
                series.append(None if queue is None else queue.get(key))
        # the next tick on the fixed grid from the start, skipping ticks a slow scrape overran
        wait = (math.floor(now / interval) + 1) * interval - (time.perf_counter() - t0)
        if wait > 0:
            try:
                await asyncio.wait_for(stop.wait(), wait)
            except asyncio.TimeoutError:
                pass


async def _scrape(client: httpx.AsyncClient, url: str) -> Optional[dict[str, float]]:
    try:
        r = await client.get(url.rstrip("/") + "/metrics", timeout=1.0)
        return parse_queue(r.text) if r.status_code == 200 else None
    except httpx.HTTPError:
        return None


async def server_exports_queue(url: str) -> bool:
    async with httpx.AsyncClient() as client:
        return await _scrape(client, url) is not None


class _Driver:
    """Sends jobs within the connection and time bounds and keeps the live counts."""

    def __init__(self, client: httpx.AsyncClient, config: BenchConfig, prompt_kind: str, t0: float,
                 on_done: Callable[[RequestRecord, LoadState], None]):
        self.client, self.config, self.prompt_kind, self.t0 = client, config, prompt_kind, t0
        self.deadline = t0 + config.duration_s
        self.slots = asyncio.Semaphore(config.max_connections)
        self.state, self.records, self.on_done = LoadState(), [], on_done

    async def fire(self, job: Job) -> None:
        self.state.pending += 1
        async with self.slots:
            self.state.pending -= 1
            if time.perf_counter() >= self.deadline:
                return  # waited for a connection past the end: not sent
            self.state.in_flight += 1
            self.state.sent += 1
            record = await send(self.client, job, self.config, self.prompt_kind, self.t0)
            self.state.in_flight -= 1
        self.records.append(record)
        if record.ok:
            self.state.completed += 1
        else:
            self.state.failed += 1
        self.on_done(record, self.state)

    async def open_loop(self, jobs: list[Job]) -> None:
        tasks = []
        for job in jobs:
            at = self.t0 + job.request.arrival_s
            if at >= self.deadline:
                break
            delay = at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(self.fire(job)))
        await asyncio.gather(*tasks)

    async def closed_loop(self, jobs: list[Job]) -> None:
        queue = iter(jobs)

        async def client_loop() -> None:
            for job in queue:  # one shared iterator: each job goes to exactly one client
                if time.perf_counter() >= self.deadline:
                    return
                await self.fire(job)

        await asyncio.gather(*(client_loop() for _ in range(self.config.concurrency)))


def http_client(config: BenchConfig) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=config.max_connections, max_keepalive_connections=config.max_connections)
    # the whole-request timeout is enforced around each request; these only bound single operations
    return httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(config.request_timeout_s, pool=None))


async def warm_up(client: httpx.AsyncClient, jobs: list[Job], config: BenchConfig, prompt_kind: str) -> int:
    """Send `config.warmup` untimed requests, one after another over the jobs' variants; returns the failures."""
    by_variant: dict[str, Job] = {}
    for job in jobs:
        by_variant.setdefault(job.request.variant, job)
    firsts = list(by_variant.values())
    failed = 0
    for i in range(config.warmup if firsts else 0):
        record = await send(client, firsts[i % len(firsts)], config, prompt_kind, time.perf_counter())
        failed += not record.ok
    return failed


async def run_load(jobs: list[Job], config: BenchConfig, prompt_kind: str, scrape_queue: bool = False,
                   on_done: Callable[[RequestRecord, LoadState], None] = lambda r, s: None) -> LoadRun:
    """Send `jobs` as `config.mode` says; records are in completion order."""
    timeline = Timeline(config.sample_interval_s)
    if scrape_queue:
        timeline.server_waiting, timeline.server_running = [], []
    async with http_client(config) as client, httpx.AsyncClient() as scrape:
        await warm_up(client, jobs, config, prompt_kind)
        t0 = time.perf_counter()
        driver = _Driver(client, config, prompt_kind, t0, on_done)
        stop = asyncio.Event()
        sampler = asyncio.create_task(_sample(config, driver.state, timeline, t0, stop,
                                              scrape if scrape_queue else None))
        try:
            await (driver.open_loop(jobs) if config.mode == "open" else driver.closed_loop(jobs))
        finally:
            stop.set()
            await sampler
    records = sorted(driver.records, key=lambda r: (r.start_s, r.id))
    return LoadRun(records, timeline, len(jobs) - len(records))
