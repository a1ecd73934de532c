"""One streaming request to an OpenAI-compatible server, timed from the client.

TTFT is the time from sending to the first SSE chunk that carries text; the inter-token gaps are
the gaps between later text chunks; TPOT is (last text chunk - first) / (output tokens - 1), with
the token count from the server's `usage` (requested with `stream_options.include_usage`), or the
number of text chunks when the server sends no usage. A server that sends several tokens in one
chunk, or a token that decodes to no text, thus still gets the right TPOT.
"""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Optional

import httpx
import numpy as np

from planc.bench.config import BenchConfig
from planc.bench.result import RequestRecord
from planc.workload import Request

WORDS = ("the", "time", "of", "day", "and", "a", "long", "road", "to", "go", "in", "one", "small", "town")


@dataclass(frozen=True)
class Job:
    """A workload request with what the client adds: its id, tenant and API key."""

    id: int
    request: Request
    tenant: Optional[str]
    api_key: Optional[str]


def prompt_ids(job_id: int, length: int, config: BenchConfig) -> list[int]:
    """Seeded token ids: the same run sends the same prompts (so two servers see the same input)."""
    low, high = config.token_id_range
    return np.random.default_rng([config.seed, job_id]).integers(low, high, size=length).tolist()


def prompt_text(job_id: int, length: int, config: BenchConfig) -> str:
    """About `length` tokens of plain words (exact counts need the server's tokenizer)."""
    rng = np.random.default_rng([config.seed, job_id])
    return " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), size=length))


def request_body(job: Job, config: BenchConfig, prompt_kind: str) -> tuple[str, dict]:
    """(path, JSON body) of the job's request."""
    req = job.request
    body: dict = {"model": req.variant, "max_tokens": req.output_tokens, "temperature": config.temperature,
                  "stream": True, "stream_options": {"include_usage": True}}
    if config.ignore_eos:
        body["ignore_eos"] = True
    if config.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt_text(job.id, req.prompt_tokens, config)}]
        return "/v1/chat/completions", body
    body["prompt"] = (prompt_ids(job.id, req.prompt_tokens, config) if prompt_kind == "ids"
                      else prompt_text(job.id, req.prompt_tokens, config))
    return "/v1/completions", body


def headers_for(job: Job) -> dict:
    return {"Authorization": f"Bearer {job.api_key}"} if job.api_key else {}


def _chunk_text(chunk: dict) -> str:
    choices = chunk.get("choices") or []
    if not choices:
        return ""
    c = choices[0]
    return c.get("text") or (c.get("delta") or {}).get("content") or ""


class _Stream:
    """Reads one SSE response into the record."""

    def __init__(self, record: RequestRecord, t0: float):
        self.record, self.t0 = record, t0
        self.times: list[float] = []
        self.usage: Optional[dict] = None
        self.finished = False

    def feed(self, line: str) -> bool:
        """Handle one line; False once the stream is over."""
        if not line.startswith("data:"):
            return True
        data = line[5:].strip()
        if data == "[DONE]":
            self.finished = True
            return False
        try:
            chunk = json.loads(data)
        except json.JSONDecodeError:
            return self._fail(f"malformed SSE data: {data[:80]}")
        if "error" in chunk:  # an error after the 200 headers arrives in-band
            return self._fail(str((chunk.get("error") or {}).get("message", chunk["error"]))[:200])
        if _chunk_text(chunk):
            self.times.append(time.perf_counter())
        if any(c.get("finish_reason") for c in chunk.get("choices") or []):
            self.finished = True  # [DONE] usually follows, after the usage chunk
        self.usage = chunk.get("usage") or self.usage
        return True

    def _fail(self, message: str) -> bool:
        self.record.status, self.record.error = "stream", message
        return False

    def close(self, end: float) -> None:
        r = self.record
        r.e2e_s = end - self.t0
        n = (self.usage or {}).get("completion_tokens")
        r.output_tokens = int(n) if isinstance(n, int) else len(self.times)
        prompt = (self.usage or {}).get("prompt_tokens")
        if isinstance(prompt, int):
            r.prompt_tokens = prompt  # what the server counted (text prompts are approximate)
        if self.times:
            r.ttft_s = self.times[0] - self.t0
            r.itl_s = np.diff(self.times).tolist()
            if r.output_tokens > 1:
                r.tpot_s = (self.times[-1] - self.times[0]) / (r.output_tokens - 1)
        if r.ok and not self.finished:
            r.status, r.error = "stream", "the stream ended before a finish_reason or [DONE]"


async def send(client: httpx.AsyncClient, job: Job, config: BenchConfig, prompt_kind: str,
               run_t0: float) -> RequestRecord:
    """Send the job, stream the answer, and return what was seen; never raises for server faults."""
    req = job.request
    t0 = time.perf_counter()
    record = RequestRecord(id=job.id, variant=req.variant, tenant=job.tenant, arrival_s=req.arrival_s,
                           start_s=t0 - run_t0, prompt_tokens=req.prompt_tokens, max_tokens=req.output_tokens)
    stream = _Stream(record, t0)
    try:
        await asyncio.wait_for(_exchange(client, job, config, prompt_kind, stream), config.request_timeout_s)
    except (asyncio.TimeoutError, httpx.TimeoutException):
        record.status, record.error = "timeout", f"no complete answer within {config.request_timeout_s:g} s"
    except httpx.HTTPError as exc:  # refused, reset, broken stream
        record.status, record.error = "connection", f"{type(exc).__name__}: {exc}"[:200]
    stream.close(time.perf_counter())
    if not record.ok:
        record.output_tokens = 0
    return record


async def _exchange(client: httpx.AsyncClient, job: Job, config: BenchConfig, prompt_kind: str,
                    stream: _Stream) -> None:
    path, body = request_body(job, config, prompt_kind)
    record = stream.record
    async with client.stream("POST", config.url.rstrip("/") + path, json=body, headers=headers_for(job)) as resp:
        record.http_status = resp.status_code
        if resp.status_code >= 400:
            await resp.aread()
            record.status = "4xx" if resp.status_code < 500 else "5xx"
            record.error = _error_message(resp)
            return
        async for line in resp.aiter_lines():
            if not stream.feed(line):
                return


def _error_message(resp: httpx.Response) -> str:
    try:
        return str(resp.json()["error"]["message"])[:200]
    except (ValueError, KeyError, TypeError):
        return resp.text[:200]
