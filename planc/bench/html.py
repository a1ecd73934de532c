"""The self-contained HTML report of a run, and of two runs compared (inline SVG, no scripts)."""
from __future__ import annotations

import math
from collections import Counter
from html import escape
from typing import Callable, Optional

from planc.bench.console import COMPARE_ROWS, groups, metric
from planc.bench.metrics import cdf, throughput_series
from planc.bench.result import RequestRecord
from planc.bench.svg import PALETTE, Series, line_chart

CSS = """body{font-family:sans-serif;margin:24px;color:#222}table{border-collapse:collapse;margin:8px 0 20px}
td,th{border:1px solid #ccc;padding:3px 7px;text-align:right;font-size:13px}th{background:#f3f3f3}
td:first-child,th:first-child{text-align:left}.charts{display:flex;flex-wrap:wrap;gap:12px}
.meta td{text-align:left}h1{font-size:20px}h2{font-size:16px;margin-top:24px}"""

LATENCIES = (("ttft_ms", "TTFT", lambda r: r.ttft_s), ("tpot_ms", "TPOT", lambda r: r.tpot_s),
             ("e2e_ms", "end-to-end latency", lambda r: r.e2e_s))
QS = (("p50", 0.5), ("p90", 0.9), ("p95", 0.95), ("p99", 0.99), ("max", 1.0))


def _page(title: str, body: list[str]) -> str:
    return (f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{escape(title)}</title>"
            f"<style>{CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def _num(v: Optional[float], digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _summary_table(result: dict) -> str:
    head = ("group", "requests", "completed", "errors", "req/s", "out tok/s", "TTFT p50/p90/p95/p99 ms",
            "TPOT p50/p90/p95/p99 ms", "ITL p50/p99 ms", "E2E p50/p99 ms", "SLO attainment")
    rows = []
    for name, g in groups(result):
        def q(key, names=("p50", "p90", "p95", "p99")):
            return " / ".join(_num((g.get(key) or {}).get(n)) for n in names)
        errors = ", ".join(f"{k}: {v}" for k, v in g["errors"].items()) or "-"
        slo = "-" if g.get("slo_attainment") is None else f"{100 * g['slo_attainment']:.1f}%"
        cells = (name, g["requests"], g["completed"], errors, _num(g["requests_per_s"], 2),
                 _num(g["output_tokens_per_s"]), q("ttft_ms"), q("tpot_ms"), q("itl_ms", ("p50", "p99")),
                 q("e2e_ms", ("p50", "p99")), slo)
        rows.append("<tr>" + "".join(f"<td>{escape(str(c))}</td>" for c in cells) + "</tr>")
    return "<table><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>" + "".join(rows) + "</table>"


def _meta_table(result: dict) -> str:
    meta, counts, slo = result.get("meta", {}), result.get("counts") or {}, result.get("slo") or {}
    items = [(k, meta.get(k)) for k in ("source", "url", "bundle", "workload", "mode", "concurrency", "prompt",
                                        "started_at") if meta.get(k) is not None]
    items.append(("duration", f"{result.get('duration_s') or 0:.2f} s"))
    items += [(k, v) for k, v in counts.items()]
    items += [(f"SLO {k}", v) for k, v in slo.items() if v is not None]
    return "<table class='meta'>" + "".join(f"<tr><th>{escape(str(k))}</th><td>{escape(str(v))}</td></tr>"
                                            for k, v in items) + "</table>"


def _cdf_from_summary(p: Optional[dict]) -> tuple[list, list]:
    """A coarse CDF through the percentiles, for results that carry no per-request records."""
    if not p:
        return [], []
    pts = [(p[k], q) for k, q in QS if p.get(k) is not None]
    return [x for x, _ in pts], [q for _, q in pts]


def _latency_cdf(records: Optional[list[RequestRecord]], group: dict, key: str,
                 get: Callable[[RequestRecord], Optional[float]]) -> tuple[list, list]:
    if records is None:
        return _cdf_from_summary(group.get(key))
    return cdf(get(r) * 1e3 for r in records if r.ok and get(r) is not None)


def _wide(xs: list) -> bool:
    return bool(xs) and min(xs) > 0 and max(xs) / min(xs) > 50


def _cdf_charts(result: dict) -> list[str]:
    records = result.get("records")
    s = result["summary"]
    charts = []
    for key, name, get in LATENCIES:
        series = [Series("all", *_latency_cdf(records, s["overall"], key, get), color="#000", step=True)]
        for i, (variant, g) in enumerate(s.get("by_variant", {}).items()):
            subset = None if records is None else [r for r in records if r.variant == variant]
            series.append(Series(variant, *_latency_cdf(subset, g, key, get), color=PALETTE[i % len(PALETTE)],
                                 step=True))
        xs = [x for se in series for x in se.xs]
        charts.append(line_chart(series, f"{name} CDF per variant", f"{name} (ms)", "fraction of requests",
                                 log_x=_wide(xs), y_range=(0.0, 1.0)))
    return charts


def _bin_s(duration: float) -> float:
    """About 60 bins over the run, at a round width."""
    raw = max(duration, 0.1) / 60
    mag = 10 ** math.floor(math.log10(raw))
    return next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)


def _time_charts(result: dict, records: list[RequestRecord]) -> list[str]:
    ts = throughput_series(records, _bin_s(result.get("duration_s") or 0.0))
    tl = result.get("timeline") or {}
    charts = [line_chart([Series("output tok/s", ts["t_s"], ts["output_tokens_per_s"], step=True)],
                         "output tokens/s over time", "time (s)", "tokens/s"),
              line_chart([Series("completed req/s", ts["t_s"], ts["requests_per_s"], step=True)],
                         "completed requests/s over time", "time (s)", "requests/s")]
    queue = [Series("in flight (client)", tl.get("t_s", []), tl.get("in_flight", [])),
             Series("waiting in client", tl.get("t_s", []), tl.get("pending", []), dashed=True)]
    for key, label in (("server_waiting", "server queue"), ("server_running", "server running")):
        if tl.get(key):
            pts = [(t, v) for t, v in zip(tl["t_s"], tl[key]) if v is not None]
            queue.append(Series(label, [t for t, _ in pts], [v for _, v in pts]))
    charts.append(line_chart(queue, "requests in flight and queued", "time (s)", "requests"))
    return charts


def _errors_section(records: list[RequestRecord]) -> list[str]:
    seen = Counter((r.status, r.http_status, r.error) for r in records if not r.ok)
    if not seen:
        return []
    rows = "".join(f"<tr><td>{escape(k)}</td><td>{escape(str(c or '-'))}</td><td>{n}</td><td style='text-align:left'>"
                   f"{escape(m or '')}</td></tr>" for (k, c, m), n in seen.most_common(20))
    return ["<h2>Errors</h2><table><tr><th>kind</th><th>HTTP</th><th>count</th><th>message</th></tr>" + rows + "</table>"]


def report_html(result: dict) -> str:
    label = result.get("meta", {}).get("label", "planc bench")
    records = result.get("records")
    body = [f"<h1>planc bench: {escape(str(label))}</h1>", _meta_table(result), "<h2>Summary</h2>",
            _summary_table(result), "<h2>Latency</h2><div class='charts'>", *_cdf_charts(result), "</div>"]
    if records is not None:
        body += ["<h2>Over time</h2><div class='charts'>", *_time_charts(result, records), "</div>"]
        body += _errors_section(records)
    return _page(f"planc bench: {label}", body)


def _compare_rows(a: dict, b: dict) -> str:
    la, lb = escape(a["meta"].get("label", "A")), escape(b["meta"].get("label", "B"))
    head = f"<tr><th>group</th><th>metric</th><th>A: {la}</th><th>B: {lb}</th><th>B / A</th></tr>"
    rows = []
    names = ["overall"] + sorted(set(a["summary"].get("by_variant", {})) & set(b["summary"].get("by_variant", {})))
    for name in names:
        ga = a["summary"]["overall"] if name == "overall" else a["summary"]["by_variant"][name]
        gb = b["summary"]["overall"] if name == "overall" else b["summary"]["by_variant"][name]
        for key, sub, label in COMPARE_ROWS:
            x, y = metric(ga, key, sub), metric(gb, key, sub)
            ratio = f"{y / x:.2f}" if x and y is not None else "-"
            rows.append(f"<tr><td>{escape(name)}</td><td>{label}</td><td>{_num(x, 2)}</td><td>{_num(y, 2)}</td>"
                        f"<td>{ratio}</td></tr>")
    return "<table>" + head + "".join(rows) + "</table>"


def compare_html(a: dict, b: dict) -> str:
    la, lb = a["meta"].get("label", "A"), b["meta"].get("label", "B")
    charts = []
    for key, name, get in LATENCIES:
        series = [Series(f"A: {la}", *_latency_cdf(a.get("records"), a["summary"]["overall"], key, get),
                         color=PALETTE[0], step=True),
                  Series(f"B: {lb}", *_latency_cdf(b.get("records"), b["summary"]["overall"], key, get),
                         color=PALETTE[1], dashed=True, step=True)]
        xs = [x for s in series for x in s.xs]
        charts.append(line_chart(series, f"{name} CDF, all requests", f"{name} (ms)", "fraction of requests",
                                 log_x=_wide(xs), y_range=(0.0, 1.0)))
    tput = []
    for i, r in enumerate((a, b)):
        if r.get("records") is not None:
            ts = throughput_series(r["records"], _bin_s(max(a.get("duration_s") or 0, b.get("duration_s") or 0)))
            tput.append(Series(("A: " if i == 0 else "B: ") + r["meta"].get("label", ""), ts["t_s"],
                               ts["output_tokens_per_s"], color=PALETTE[i], dashed=i == 1, step=True))
    charts.append(line_chart(tput, "output tokens/s over time", "time (s)", "tokens/s"))
    body = [f"<h1>planc bench: {escape(str(la))} vs {escape(str(lb))}</h1>",
            "<h2>A</h2>", _meta_table(a), "<h2>B</h2>", _meta_table(b),
            "<h2>Side by side</h2>", _compare_rows(a, b), "<h2>Plots</h2><div class='charts'>", *charts, "</div>"]
    return _page(f"planc bench: {la} vs {lb}", body)
