"""Per-request outcomes of a simulated run and their summary (latency percentiles, throughput, SLO).

Latencies are defined as a client measures them: TTFT = first token - arrival; TPOT = (last token -
first token) / (tokens - 1); end-to-end = last token - arrival. The summary's JSON uses
milliseconds for latencies, as `planc bench`'s settings do (slo_ttft_ms, slo_tpot_ms).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Optional

import numpy as np

PERCENTILES = (50, 90, 95, 99)


@dataclass
class RequestRecord:
    index: int
    """Position in the workload's request list."""
    variant: str
    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    """Tokens requested (max_tokens; the simulation ignores EOS, as bench runs send ignore_eos)."""
    replica: Optional[int] = None
    first_token_s: Optional[float] = None
    last_token_s: Optional[float] = None
    finish_s: Optional[float] = None
    num_tokens: int = 0
    num_preemptions: int = 0
    status: str = "pending"
    """ok; rejected (too long for max_model_len or the KV cache: HTTP 400); refused (queue full: HTTP 429);
    error (could not be scheduled); pending (still running when the simulation stopped)."""

    @property
    def ttft_s(self) -> Optional[float]:
        return None if self.first_token_s is None else self.first_token_s - self.arrival_s

    @property
    def tpot_s(self) -> Optional[float]:
        if self.first_token_s is None or self.num_tokens < 2:
            return None
        return (self.last_token_s - self.first_token_s) / (self.num_tokens - 1)

    @property
    def e2e_s(self) -> Optional[float]:
        return None if self.status != "ok" else self.last_token_s - self.arrival_s


def distribution(values: Iterable[Optional[float]], scale: float = 1e3) -> dict[str, Optional[float]]:
    """mean, p50/p90/p95/p99 and max of the non-missing values (times `scale`: seconds -> ms)."""
    xs = np.asarray([v for v in values if v is not None], dtype=np.float64) * scale
    if xs.size == 0:
        return {"mean": None, **{f"p{p}": None for p in PERCENTILES}, "max": None}
    out = {"mean": float(xs.mean())}
    out.update({f"p{p}": float(v) for p, v in zip(PERCENTILES, np.percentile(xs, PERCENTILES))})
    out["max"] = float(xs.max())
    return out


def summarize_records(records: list[RequestRecord], slo_ttft_ms: Optional[float] = None,
                      slo_tpot_ms: Optional[float] = None) -> dict[str, Any]:
    """Counts, throughput over the span from the first arrival to the last token, latencies, SLO attainment."""
    ok = [r for r in records if r.status == "ok"]
    counts = {s: sum(r.status == s for r in records) for s in ("ok", "rejected", "refused", "error", "pending")}
    start = min((r.arrival_s for r in records), default=0.0)
    end = max((r.last_token_s for r in ok), default=start)
    span = end - start
    tokens = sum(r.num_tokens for r in records)
    out: dict[str, Any] = {
        "requests": {"sent": len(records), **counts},
        "duration_s": span,
        "throughput": {"requests_per_s": len(ok) / span if span > 0 else None,
                       "output_tokens_per_s": tokens / span if span > 0 else None},
        "output_tokens": tokens,
        "ttft_ms": distribution(r.ttft_s for r in ok),
        "tpot_ms": distribution(r.tpot_s for r in ok),
        "e2e_ms": distribution(r.e2e_s for r in ok),
        "preemptions": sum(r.num_preemptions for r in records),
    }
    if slo_ttft_ms is not None or slo_tpot_ms is not None:
        met = sum(_meets(r, slo_ttft_ms, slo_tpot_ms) for r in ok)
        # a request that never completed missed its SLO
        out["slo"] = {"ttft_ms": slo_ttft_ms, "tpot_ms": slo_tpot_ms,
                      "attainment": met / len(records) if records else None}
    return out


def _meets(r: RequestRecord, ttft_ms: Optional[float], tpot_ms: Optional[float]) -> bool:
    if ttft_ms is not None and r.ttft_s * 1e3 > ttft_ms:
        return False
    tpot = r.tpot_s
    return tpot_ms is None or tpot is None or tpot * 1e3 <= tpot_ms


@dataclass
class SimResult:
    requests: list[RequestRecord]
    replicas: list[tuple[float, int, int]]
    """(busy seconds, steps, preemptions) per replica."""
    makespan_s: float
    capacity_tokens: int = 0
    """Longest sequence one replica's KV cache holds."""
    num_pages: int = 0

    def utilization(self) -> float:
        """Mean over replicas of the busy share of the span from the first arrival to the last token."""
        start = min((r.arrival_s for r in self.requests), default=0.0)
        span = self.makespan_s - start
        if span <= 0:
            return 0.0
        return float(np.mean([busy / span for busy, _, _ in self.replicas]))

    def summary(self, slo_ttft_ms: Optional[float] = None, slo_tpot_ms: Optional[float] = None) -> dict[str, Any]:
        """The result as JSON-ready data: overall figures, then per variant, then per replica."""
        out = summarize_records(self.requests, slo_ttft_ms, slo_tpot_ms)
        out["utilization"] = self.utilization()
        start = min((r.arrival_s for r in self.requests), default=0.0)
        span = self.makespan_s - start
        out["replicas"] = [{"busy_s": b, "steps": n, "preemptions": p, "utilization": b / span if span > 0 else 0.0}
                           for b, n, p in self.replicas]
        variants = sorted({r.variant for r in self.requests})
        out["per_variant"] = {v: summarize_records([r for r in self.requests if r.variant == v], slo_ttft_ms,
                                                   slo_tpot_ms) for v in variants}
        return out


_BENCH_STATUS = {"ok": ("ok", 200), "rejected": ("4xx", 400), "refused": ("4xx", 429), "error": ("5xx", 500),
                 "pending": ("timeout", None)}


def bench_result(result: SimResult, label: str = "simulated", slo_ttft_ms: Optional[float] = None,
                 slo_tpot_ms: Optional[float] = None, meta: Optional[dict] = None) -> dict[str, Any]:
    """The run in `planc bench`'s result schema (planc.bench.result), so that
    `planc bench --compare measured.json simulated.json` compares a prediction with a measurement.
    Write it with `planc.bench.result.write_result`."""
    from planc.bench.metrics import summarize_result
    from planc.bench.result import SCHEMA, RequestRecord as BenchRecord

    records = []
    for r in result.requests:
        status, http = _BENCH_STATUS[r.status]
        records.append(BenchRecord(
            id=r.index, variant=r.variant, tenant=None, arrival_s=r.arrival_s, start_s=r.arrival_s,
            prompt_tokens=r.prompt_tokens, max_tokens=r.output_tokens, status=status, http_status=http,
            error=None if status == "ok" else r.status, output_tokens=r.num_tokens, ttft_s=r.ttft_s,
            tpot_s=r.tpot_s, e2e_s=r.e2e_s))
    records.sort(key=lambda rec: (rec.start_s, rec.id))  # bench lists requests in send order
    slo = {"ttft_ms": slo_ttft_ms, "tpot_ms": slo_tpot_ms}
    completed = sum(rec.ok for rec in records)
    info = {"label": label, "source": "simulated", "mode": "open", "utilization": result.utilization(),
            "preemptions": sum(r.num_preemptions for r in result.requests), "replicas": len(result.replicas),
            **(meta or {})}
    return {"schema": SCHEMA, "meta": info, "slo": slo, **summarize_result(records, slo),
            "counts": {"workload": len(records), "sent": len(records), "completed": completed,
                       "failed": len(records) - completed, "not_sent": 0},
            "records": records}
