"""The result file of `planc bench` (schema `planc.bench/1`), also the shape a simulator writes.

A measured run and a predicted one are compared by `planc bench --compare A.json B.json`, so both
use this one JSON shape. Times in per-request records are seconds (`_s`); summaries are in
milliseconds (`_ms`). Only `schema` and one of `requests` or `summary` are required: a simulator that
predicts per-request times writes `requests` (the summary is derived with `planc.bench.metrics`), one
that predicts only percentiles writes `summary` (CDFs are then drawn through the percentiles).

```
{
  "schema": "planc.bench/1",
  "meta": {                       # free-form description of the run; these keys are used when present
    "label": "planc tiny c=8",    # name in reports
    "source": "measured",         # or "simulated"
    "url": "http://127.0.0.1:8000", "bundle": null, "workload": "...", "mode": "open" | "closed",
    "concurrency": 8, "started_at": "2026-11-25T16:04:00+00:00", "config": {...BenchConfig...}
  },
  "slo": {"ttft_ms": 500 | null, "tpot_ms": 50 | null},
  "duration_s": 12.3,             # first send to last response end
  "counts": {"workload": 100, "sent": 80, "completed": 78, "failed": 2, "not_sent": 20},
  "requests": [                   # one per request sent, in send order
    {"id": 0, "variant": "legal", "tenant": "acme" | null,
     "arrival_s": 0.0,            # scheduled arrival (0 in closed loop)
     "start_s": 0.001,            # when it was sent (from the run's start)
     "prompt_tokens": 32, "max_tokens": 16,
     "status": "ok" | "4xx" | "5xx" | "timeout" | "connection" | "stream",
     "http_status": 200 | null, "error": null | "message",
     "output_tokens": 16,         # the server's usage.completion_tokens, else content chunks
     "ttft_s": 0.05, "tpot_s": 0.006, "e2e_s": 0.14,   # null when not reached
     "itl_s": [0.006, ...]}       # gaps between content chunks; optional
  ],
  "summary": {"overall": G, "by_variant": {"legal": G, ...}, "by_tenant": {"acme": G, ...}},
  "timeline": {"interval_s": 0.5, "t_s": [...], "in_flight": [...], "pending": [...],
               "server_waiting": [...] | null, "server_running": [...] | null}
}
G = {"requests": n sent, "completed": n, "failed": n, "errors": {"4xx": n, ...},
     "status_codes": {"403": n, ...}, "prompt_tokens": n, "output_tokens": n,
     "requests_per_s": x, "output_tokens_per_s": x, "goodput_requests_per_s": x | null,
     "slo_attainment": 0..1 | null,
     "ttft_ms": P, "tpot_ms": P, "itl_ms": P, "e2e_ms": P}
P = {"n": count, "mean": x, "p50": x, "p90": x, "p95": x, "p99": x, "max": x} | null
```
Error kinds: `4xx`/`5xx` an HTTP error status; `timeout` the request passed `request_timeout_s`;
`connection` the connection failed or broke; `stream` an error event inside a 200 stream or a stream
that ended without finishing. A request counts as completed only with status `ok`.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, ValidationError

from planc.errors import PlancError

SCHEMA = "planc.bench/1"
ERROR_KINDS = ("4xx", "5xx", "timeout", "connection", "stream")


@dataclass
class RequestRecord:
    """What the client saw of one request."""

    id: int
    variant: str
    tenant: Optional[str]
    arrival_s: float
    start_s: float
    prompt_tokens: int
    max_tokens: int
    status: str = "ok"
    http_status: Optional[int] = None
    error: Optional[str] = None
    output_tokens: int = 0
    ttft_s: Optional[float] = None
    tpot_s: Optional[float] = None
    e2e_s: Optional[float] = None
    itl_s: list[float] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_json(self) -> dict:
        d = asdict(self)
        for key in ("arrival_s", "start_s", "ttft_s", "tpot_s", "e2e_s"):
            if d[key] is not None:
                d[key] = round(d[key], 6)
        d["itl_s"] = [round(x, 6) for x in self.itl_s]
        return d


# ------------------------------------------------------------------ validation of files read back
class _Loose(BaseModel):
    model_config = ConfigDict(extra="allow")


class _Record(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: int = 0
    variant: str
    tenant: Optional[str] = None
    arrival_s: float = 0.0
    start_s: float = 0.0
    prompt_tokens: int = 0
    max_tokens: int = 0
    status: Literal["ok", "4xx", "5xx", "timeout", "connection", "stream"] = "ok"
    http_status: Optional[int] = None
    error: Optional[str] = None
    output_tokens: int = 0
    ttft_s: Optional[float] = None
    tpot_s: Optional[float] = None
    e2e_s: Optional[float] = None
    itl_s: list[float] = []


class _ResultFile(BaseModel):
    model_config = ConfigDict(extra="allow")
    schema_: Literal["planc.bench/1"]
    meta: dict[str, Any] = {}
    slo: dict[str, Optional[float]] = {}
    duration_s: Optional[float] = None
    counts: Optional[dict[str, int]] = None
    requests: Optional[list[_Record]] = None
    summary: Optional[dict[str, Any]] = None
    timeline: Optional[dict[str, Any]] = None


def load_result(path: Path) -> dict:
    """A result file, validated; a summary is derived from the requests when the file has none."""
    from planc.bench.metrics import summarize_result

    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PlancError(f"{path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PlancError(f"{path}: not JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise PlancError(f"{path}: expected a JSON object with \"schema\": \"{SCHEMA}\"")
    raw = {("schema_" if k == "schema" else k): v for k, v in raw.items()}
    try:
        parsed = _ResultFile.model_validate(raw)
    except ValidationError as exc:
        e = exc.errors()[0]
        where = ".".join(str(p) for p in e["loc"]).replace("schema_", "schema")
        raise PlancError(f"{path}: {where}: {e['msg']}") from None
    if parsed.requests is None and parsed.summary is None:
        raise PlancError(f"{path}: needs `requests` or `summary`")
    result = parsed.model_dump()
    result["schema"] = result.pop("schema_")
    if parsed.requests is not None:
        records = [RequestRecord(**{k: v for k, v in r.model_dump().items() if k in _FIELDS}) for r in parsed.requests]
        result["records"] = records
        if parsed.summary is None:
            result.update(summarize_result(records, result.get("slo") or {}))
    result.setdefault("meta", {}).setdefault("label", path.stem)
    return result


_FIELDS = set(RequestRecord.__dataclass_fields__)


def write_result(path: Path, result: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {k: v for k, v in result.items() if k != "records"}
    body["requests"] = [r.to_json() for r in result.get("records", [])]
    path.write_text(json.dumps(body, indent=1) + "\n", encoding="utf-8")
