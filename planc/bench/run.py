"""One bench run from start to result: find the variants, build the requests, send them, summarize.

Against a server already running on 127.0.0.1:8000, closed loop, 8 clients, 32 requests::

    from planc.bench.config import make_config
    from planc.bench.run import BenchPlan, run_bench
    result = run_bench(BenchPlan(make_config(url="http://127.0.0.1:8000", mode="closed", concurrency=8,
                                             max_requests=32)))
    result["summary"]["overall"]["ttft_ms"]["p95"]
"""
from __future__ import annotations

import asyncio
import datetime
from dataclasses import dataclass, field
from typing import Callable, Optional, Union

import httpx

from planc.bench.client import Job, headers_for, request_body
from planc.bench.config import BenchConfig, Tenant
from planc.bench.loadgen import LoadState, run_load, server_exports_queue
from planc.bench.metrics import summarize_result
from planc.bench.result import SCHEMA, RequestRecord
from planc.errors import PlancError
from planc.workload import BurstGPTWorkload, GammaWorkload, Request, round_robin

Workload = Union[GammaWorkload, BurstGPTWorkload]


@dataclass
class BenchPlan:
    """What to send: a workload (its arrival times drive the open loop), or, without one, fixed-length
    requests cycling over the variants (closed loop)."""

    config: BenchConfig
    workload: Optional[Workload] = None
    requests: Optional[list[Request]] = None
    """Explicit requests (library use); take precedence over `workload`."""
    fixed_lengths: tuple[int, int] = (32, 32)
    """(prompt, output) tokens of the requests made when there is no workload."""
    variants: Optional[list[str]] = None
    """Variants to spread requests over; default: the tenants' lists, else what /v1/models lists."""
    meta: dict = field(default_factory=dict)


async def served_variants(config: BenchConfig) -> list[str]:
    """Union of /v1/models over the tenants' keys (a key sees only its own variants)."""
    keys = [t.api_key() for t in config.tenants] or [None]
    names: list[str] = []
    async with httpx.AsyncClient(timeout=30) as client:
        for key in dict.fromkeys(keys):
            url = config.url.rstrip("/") + "/v1/models"
            try:
                r = await client.get(url, headers={"Authorization": f"Bearer {key}"} if key else {})
            except httpx.HTTPError as exc:
                raise PlancError(f"cannot reach {config.url}: {type(exc).__name__}: {exc}") from None
            if r.status_code == 401:
                raise PlancError(f"{url}: 401, the server wants an API key (pass --tenant NAME=ENVVAR)")
            if r.status_code != 200:
                raise PlancError(f"{url}: HTTP {r.status_code}; name the variants with --variants")
            names += [m["id"] for m in r.json().get("data", []) if m.get("id") not in names]
    if not names:
        raise PlancError(f"{config.url}/v1/models lists no models")
    return names


def choose_variants(plan: BenchPlan, served: Callable[[], list[str]]) -> list[str]:
    if plan.variants:
        return list(plan.variants)
    tenants = plan.config.tenants
    if tenants and all(t.variants for t in tenants):
        return list(dict.fromkeys(v for t in tenants for v in t.variants))
    return served()


def assign_tenants(requests: list[Request], tenants: list[Tenant]) -> list[Job]:
    """Each request goes to a tenant that sends its variant, in turn (deterministic)."""
    if not tenants:
        return [Job(i, r, None, None) for i, r in enumerate(requests)]
    keys = {t.name: t.api_key() for t in tenants}
    jobs = []
    for i, r in enumerate(requests):
        candidates = [t for t in tenants if t.sends(r.variant)]
        if not candidates:
            raise PlancError(f"no --tenant sends requests for variant {r.variant!r}; list it in a tenant's variants")
        t = candidates[i % len(candidates)]
        jobs.append(Job(i, r, t.name, keys[t.name]))
    return jobs


async def probe_prompt_kind(config: BenchConfig, job: Job) -> str:
    """'ids' when the server takes a token-id prompt (exact lengths), else 'text'."""
    if config.endpoint == "chat":
        return "text"
    if config.prompt != "auto":
        return config.prompt
    path, body = request_body(job, config, "ids")
    body.update(stream=False, max_tokens=1)
    body.pop("stream_options")
    try:
        async with httpx.AsyncClient(timeout=config.request_timeout_s) as client:
            r = await client.post(config.url.rstrip("/") + path, json=body, headers=headers_for(job))
    except httpx.HTTPError as exc:
        raise PlancError(f"cannot reach {config.url}: {type(exc).__name__}: {exc}") from None
    return "text" if r.status_code == 400 and "prompt" in r.text else "ids"


def build_jobs(plan: BenchPlan, variants: list[str]) -> tuple[list[Job], int]:
    """The jobs to send (at most max_requests) and the workload's full request count."""
    if plan.requests is not None:
        requests = list(plan.requests)
    elif plan.workload is not None:
        requests = plan.workload.requests(variants)
    else:
        prompt, output = plan.fixed_lengths
        requests = round_robin(variants, plan.config.max_requests, prompt, output)
    return assign_tenants(requests[:plan.config.max_requests], plan.config.tenants), len(requests)


async def _run(plan: BenchPlan, on_start: Callable[[int], None],
               on_done: Callable[[RequestRecord, LoadState], None]) -> dict:
    config = plan.config
    served: list[str] = []
    if not plan.variants and plan.requests is None:
        served = await served_variants(config)
    variants = choose_variants(plan, lambda: served)
    jobs, offered = build_jobs(plan, variants)
    if not jobs:
        raise PlancError("the workload has no requests to send")
    kind = await probe_prompt_kind(config, jobs[0])
    scrape = config.scrape_metrics and await server_exports_queue(config.url)
    on_start(len(jobs))
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    load = await run_load(jobs, config, kind, scrape_queue=scrape, on_done=on_done)
    slo = {"ttft_ms": config.slo_ttft_ms, "tpot_ms": config.slo_tpot_ms}
    completed = sum(r.ok for r in load.records)
    meta = {"label": config.label or plan.meta.get("bundle") or config.url, "source": "measured",
            "url": config.url, "mode": config.mode, "concurrency": config.concurrency if config.mode == "closed" else None,
            "prompt": kind, "started_at": started, "variants": variants, **plan.meta,
            "config": config.model_dump(mode="json", exclude={"tenants"}),
            "tenants": [t.model_dump(mode="json") for t in config.tenants]}
    return {"schema": SCHEMA, "meta": meta, "slo": slo, **summarize_result(load.records, slo),
            "counts": {"workload": offered, "sent": len(load.records), "completed": completed,
                       "failed": len(load.records) - completed, "not_sent": offered - len(load.records)},
            "timeline": load.timeline.to_json(), "records": load.records}


def run_bench(plan: BenchPlan, on_start: Callable[[int], None] = lambda n: None,
              on_done: Callable[[RequestRecord, LoadState], None] = lambda r, s: None) -> dict:
    """Run the plan; the result dict has the JSON schema of planc.bench.result plus `records`."""
    return asyncio.run(_run(plan, on_start, on_done))
