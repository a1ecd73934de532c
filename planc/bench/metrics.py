"""Latency percentiles, throughput, errors and SLO attainment from per-request records.

Percentiles interpolate linearly between order statistics (numpy's default method), so p50 of
[1, 2, 3, 4] is 2.5. Throughput of every group (overall, a variant, a tenant) divides by the whole
run's duration, from the first send to the last response end: per-group figures add up to the total.

>>> percentiles([1.0, 2.0, 3.0, 4.0])["p50"]
2.5
"""
from __future__ import annotations

from collections import Counter
from typing import Callable, Iterable, Optional

import numpy as np

from planc.bench.result import ERROR_KINDS, RequestRecord

QUANTILES = (50, 90, 95, 99)


def percentiles(values: Iterable[float]) -> Optional[dict]:
    """n, mean, p50/p90/p95/p99 and max of `values`; None when there are none."""
    xs = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if xs.size == 0:
        return None
    qs = np.percentile(xs, QUANTILES)
    out = {"n": int(xs.size), "mean": float(xs.mean())}
    out.update({f"p{q}": float(v) for q, v in zip(QUANTILES, qs)})
    out["max"] = float(xs.max())
    return out


def run_duration(records: list[RequestRecord]) -> float:
    """First send to the last response end (or last send, for requests that never ended)."""
    if not records:
        return 0.0
    start = min(r.start_s for r in records)
    end = max(r.start_s + (r.e2e_s or 0.0) for r in records)
    return max(end - start, 0.0)


def meets_slo(r: RequestRecord, slo: dict) -> bool:
    """Completed, within the TTFT SLO and within the TPOT SLO (a one-token answer has no TPOT)."""
    if not r.ok:
        return False
    ttft, tpot = slo.get("ttft_ms"), slo.get("tpot_ms")
    if ttft is not None and (r.ttft_s is None or r.ttft_s * 1e3 > ttft):
        return False
    if tpot is not None and r.tpot_s is not None and r.tpot_s * 1e3 > tpot:
        return False
    return True


def _ms(records: list[RequestRecord], get: Callable[[RequestRecord], Optional[float]]) -> Optional[dict]:
    return percentiles(get(r) * 1e3 for r in records if get(r) is not None)


def group_summary(records: list[RequestRecord], duration_s: float, slo: dict) -> dict:
    """The figures of one group of requests (see the G shape in planc.bench.result)."""
    done = [r for r in records if r.ok]
    has_slo = slo.get("ttft_ms") is not None or slo.get("tpot_ms") is not None
    met = sum(meets_slo(r, slo) for r in records) if has_slo else None
    per_s = (lambda n: n / duration_s) if duration_s > 0 else (lambda n: 0.0)
    errors = Counter(r.status for r in records if not r.ok)
    return {
        "requests": len(records),
        "completed": len(done),
        "failed": len(records) - len(done),
        "errors": {k: errors[k] for k in ERROR_KINDS if errors[k]},
        "status_codes": dict(sorted(Counter(str(r.http_status) for r in records if r.http_status is not None).items())),
        "prompt_tokens": sum(r.prompt_tokens for r in records),
        "output_tokens": sum(r.output_tokens for r in done),
        "requests_per_s": per_s(len(done)),
        "output_tokens_per_s": per_s(sum(r.output_tokens for r in done)),
        "goodput_requests_per_s": per_s(met) if has_slo else None,
        "slo_attainment": (met / len(records) if records else None) if has_slo else None,
        # latencies of completed requests only: a 403 answered in 1 ms is not a fast request
        "ttft_ms": _ms(done, lambda r: r.ttft_s),
        "tpot_ms": _ms(done, lambda r: r.tpot_s),
        "itl_ms": percentiles(x * 1e3 for r in done for x in r.itl_s),
        "e2e_ms": _ms(done, lambda r: r.e2e_s),
    }


def _by(records: list[RequestRecord], key: Callable[[RequestRecord], Optional[str]]) -> dict[str, list]:
    groups: dict[str, list] = {}
    for r in records:
        k = key(r)
        if k is not None:
            groups.setdefault(k, []).append(r)
    return dict(sorted(groups.items()))


def summarize_result(records: list[RequestRecord], slo: dict, duration_s: Optional[float] = None) -> dict:
    """`duration_s` and `summary` (overall, by variant, by tenant) of a run's records."""
    duration = run_duration(records) if duration_s is None else duration_s
    return {
        "duration_s": duration,
        "summary": {
            "overall": group_summary(records, duration, slo),
            "by_variant": {k: group_summary(g, duration, slo) for k, g in _by(records, lambda r: r.variant).items()},
            "by_tenant": {k: group_summary(g, duration, slo) for k, g in _by(records, lambda r: r.tenant).items()},
        },
    }


def token_times(r: RequestRecord) -> list[float]:
    """Times (from the run's start) at which the request's output tokens arrived, reconstructed
    from TTFT and the inter-chunk gaps, or spread evenly to the end when the gaps are unknown."""
    if r.ttft_s is None or not r.ok:
        return []
    first = r.start_s + r.ttft_s
    if r.itl_s:
        times = list(np.cumsum([first] + list(r.itl_s)))
        return times + [times[-1]] * max(r.output_tokens - len(times), 0)  # chunks that held several tokens
    end = r.start_s + (r.e2e_s or r.ttft_s)
    return list(np.linspace(first, end, max(r.output_tokens, 1)))


def throughput_series(records: list[RequestRecord], bin_s: float) -> dict:
    """Completed requests/s and output tokens/s per time bin, for the plots."""
    if not records:
        return {"t_s": [], "requests_per_s": [], "output_tokens_per_s": []}
    end = max(r.start_s + (r.e2e_s or 0.0) for r in records)
    edges = np.arange(0.0, end + bin_s, bin_s)
    if edges.size < 2:
        edges = np.array([0.0, bin_s])
    done = np.histogram([r.start_s + r.e2e_s for r in records if r.ok and r.e2e_s is not None], bins=edges)[0]
    toks = np.histogram([t for r in records for t in token_times(r)], bins=edges)[0]
    return {"t_s": edges[1:].tolist(), "requests_per_s": (done / bin_s).tolist(),
            "output_tokens_per_s": (toks / bin_s).tolist()}


def cdf(values: Iterable[float]) -> tuple[list[float], list[float]]:
    """Sorted values and their cumulative fractions, starting at (smallest, 0) so that a staircase
    drawn through them rises at every value, the first included."""
    xs = sorted(v for v in values if v is not None)
    n = len(xs)
    if not n:
        return [], []
    return [xs[0]] + xs, [0.0] + [(i + 1) / n for i in range(n)]
