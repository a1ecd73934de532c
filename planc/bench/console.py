"""Terminal output of `planc bench`: the results table, the live progress bar, the comparison."""
from __future__ import annotations

from typing import Optional

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from planc.bench.loadgen import LoadState
from planc.bench.result import RequestRecord


def _errors(g: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in g["errors"].items()) or "-"


def groups(result: dict) -> list[tuple[str, dict]]:
    s = result["summary"]
    rows = [("all", s["overall"])]
    if len(s.get("by_variant", {})) > 1 or s.get("by_tenant"):
        rows += [(f"variant {k}", g) for k, g in s.get("by_variant", {}).items()]
    rows += [(f"tenant {k}", g) for k, g in s.get("by_tenant", {}).items()]
    return rows


def _qs(p: Optional[dict], names: tuple[str, ...]) -> str:
    return "-" if not p else " / ".join(f"{p[n]:.1f}" for n in names)


def results_table(result: dict) -> Table:
    meta, counts = result.get("meta", {}), result.get("counts") or {}
    title = (f"{meta.get('label', '')}: {counts.get('sent', '?')} sent, {counts.get('completed', '?')} completed, "
             f"{counts.get('failed', '?')} failed, {counts.get('not_sent', 0)} not sent, "
             f"{result.get('duration_s') or 0:.1f} s")
    t = Table(title=title, title_justify="left")
    cols = ("group", "sent", "ok", "errors", "req/s", "out tok/s", "TTFT ms p50/p90/p99", "TPOT ms p50/p90/p99",
            "ITL ms p50/p99", "E2E ms p50/p99", "SLO")
    for c in cols:
        t.add_column(c, justify="left" if c in ("group", "errors") else "right")
    for name, g in groups(result):
        slo = "-" if g.get("slo_attainment") is None else f"{100 * g['slo_attainment']:.0f}%"
        t.add_row(name, str(g["requests"]), str(g["completed"]), _errors(g), f"{g['requests_per_s']:.2f}",
                  f"{g['output_tokens_per_s']:.1f}", _qs(g["ttft_ms"], ("p50", "p90", "p99")),
                  _qs(g["tpot_ms"], ("p50", "p90", "p99")), _qs(g["itl_ms"], ("p50", "p99")),
                  _qs(g["e2e_ms"], ("p50", "p99")), slo)
    return t


COMPARE_ROWS = (("requests_per_s", None, "req/s"), ("output_tokens_per_s", None, "output tok/s"),
                ("ttft_ms", "p50", "TTFT p50 ms"), ("ttft_ms", "p95", "TTFT p95 ms"), ("ttft_ms", "p99", "TTFT p99 ms"),
                ("tpot_ms", "p50", "TPOT p50 ms"), ("tpot_ms", "p95", "TPOT p95 ms"), ("tpot_ms", "p99", "TPOT p99 ms"),
                ("e2e_ms", "p50", "E2E p50 ms"), ("e2e_ms", "p99", "E2E p99 ms"), ("slo_attainment", None, "SLO attainment"))


def metric(g: dict, key: str, sub: Optional[str]) -> Optional[float]:
    v = g.get(key)
    if sub is not None:
        v = (v or {}).get(sub)
    return v


def compare_table(a: dict, b: dict) -> Table:
    la, lb = a["meta"].get("label", "A"), b["meta"].get("label", "B")
    t = Table(title=f"{la} (A) vs {lb} (B), all requests", title_justify="left")
    for c in ("metric", f"A: {la}", f"B: {lb}", "B / A"):
        t.add_column(c, justify="left" if c == "metric" else "right")
    ga, gb = a["summary"]["overall"], b["summary"]["overall"]
    for key, sub, name in COMPARE_ROWS:
        x, y = metric(ga, key, sub), metric(gb, key, sub)
        ratio = f"{y / x:.2f}" if x and y is not None else "-"
        t.add_row(name, "-" if x is None else f"{x:.2f}", "-" if y is None else f"{y:.2f}", ratio)
    return t


class LiveProgress:
    """A rich progress bar on stderr: requests finished of those to send, with live counts."""

    def __init__(self, console: Console, enabled: bool = True):
        self.progress = Progress(TextColumn("[bold]bench"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[status]}"), TimeElapsedColumn(), console=console,
                                 disable=not enabled, transient=False)
        self.task = None

    def __enter__(self) -> "LiveProgress":
        self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)

    def start(self, total: int) -> None:
        self.task = self.progress.add_task("bench", total=total, status="")

    def done(self, record: RequestRecord, state: LoadState) -> None:
        status = f"ok {state.completed}  failed {state.failed}  in flight {state.in_flight}  waiting {state.pending}"
        self.progress.update(self.task, advance=1, status=status)
