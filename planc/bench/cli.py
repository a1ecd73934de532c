"""`planc bench`: the command's flags, turned into a BenchPlan, run, and written out.

Registered on planc's typer app by planc/cli.py. Heavy imports (httpx, numpy) happen inside the
command so that `planc --help` stays fast.
"""
from __future__ import annotations

import enum
import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from planc.errors import PlancError

out = Console(highlight=False, soft_wrap=True)
wide = Console(highlight=False, width=max(out.width, 150))  # the tables are wider than a default 80-column pipe
err = Console(stderr=True, highlight=False)


class PromptKind(str, enum.Enum):
    auto = "auto"
    ids = "ids"
    text = "text"


class Endpoint(str, enum.Enum):
    completions = "completions"
    chat = "chat"


def apply_overrides(workload, time_scale: Optional[float], max_rows: Optional[int], model_map: dict,
                    weights: dict, max_prompt: Optional[int], max_output: Optional[int]):
    """The workload with the command line's settings over the file's, validated again."""
    from pydantic import ValidationError

    fields = workload.model_dump()
    if workload.kind == "burstgpt":
        fields.update({k: v for k, v in (("time_scale", time_scale), ("max_rows", max_rows)) if v is not None})
        fields["model_map"] = {**fields["model_map"], **model_map}
    else:
        if model_map:
            raise PlancError("--model-map applies to a BurstGPT trace (its Model column), not a gamma workload")
        if time_scale is not None:  # scaling every gap by s is the same as dividing the rate by s
            fields["rate"] = fields["rate"] / time_scale
        if max_rows is not None:
            fields["num_requests"] = max_rows
    if weights:
        fields["variants"] = weights
    fields.update({k: v for k, v in (("max_prompt_tokens", max_prompt), ("max_output_tokens", max_output))
                   if v is not None})
    try:
        return type(workload).model_validate(fields)
    except ValidationError as exc:
        e = exc.errors()[0]
        raise PlancError(f"workload: {'.'.join(str(p) for p in e['loc'])}: {e['msg']}") from None


def bundle_tenants(bundle: Path) -> list:
    """model.yaml's tenants recorded in the bundle, as bench tenants (same env vars, same variants)."""
    from planc.bench.config import Tenant

    try:
        manifest = json.loads((bundle / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise PlancError(f"{bundle}/manifest.json: cannot read: {exc}") from None
    return [Tenant(name=t["name"], api_key_env=t["api_key_env"],
                   variants=None if "*" in t.get("variants", ["*"]) else tuple(t["variants"]))
            for t in manifest.get("tenants") or []]


def compare_files(a: Path, b: Path, html: Optional[Path]) -> None:
    from planc.bench.console import compare_table
    from planc.bench.html import compare_html
    from planc.bench.result import load_result

    ra, rb = load_result(a), load_result(b)
    wide.print(compare_table(ra, rb))
    target = html or Path("bench-compare.html")
    target.write_text(compare_html(ra, rb), encoding="utf-8")
    out.print(f"wrote {target}", markup=False)


def bench_cmd(
    url: Optional[str] = typer.Option(None, help="OpenAI-compatible server to load (base URL, without /v1)."),
    bundle: Optional[Path] = typer.Option(None, help="Start `planc serve BUNDLE` on 127.0.0.1 for the run, then stop it."),
    workload: Optional[Path] = typer.Option(None, "--workload", "-w", help="Workload YAML or BurstGPT CSV."),
    concurrency: Optional[int] = typer.Option(None, "--concurrency", "-c", min=1,
                                              help="Closed loop with this many clients (default: open loop from arrival times)."),
    num_requests: int = typer.Option(1000, "--num-requests", "--max-requests", "-n", min=1,
                                     help="Send at most this many requests."),
    duration: float = typer.Option(600.0, min=0.001, help="Start no request after this many seconds."),
    time_scale: Optional[float] = typer.Option(None, min=1e-9, help="Multiply the gaps between arrivals (0.1 = 10x faster)."),
    max_rows: Optional[int] = typer.Option(None, min=1, help="Read at most this many trace rows (gamma: requests)."),
    model_map: Optional[list[str]] = typer.Option(None, help="Trace Model value -> variant, e.g. ChatGPT=legal (repeatable)."),
    weights: Optional[list[str]] = typer.Option(None, help="Variant weights, e.g. legal=3,chat=1."),
    variants: Optional[str] = typer.Option(None, help="Comma-separated variants to send to (default: tenants' lists, else /v1/models)."),
    tenant: Optional[list[str]] = typer.Option(None, help="NAME=ENVVAR[:v1,v2]: requests of v1,v2 carry the key in $ENVVAR (repeatable)."),
    prompt_tokens: int = typer.Option(32, min=1, help="Prompt length without a workload (closed loop)."),
    output_tokens: int = typer.Option(32, min=1, help="Output length without a workload (closed loop)."),
    max_prompt_tokens: Optional[int] = typer.Option(None, min=1, help="Clip workload prompts (to fit the context)."),
    max_output_tokens: Optional[int] = typer.Option(None, min=1, help="Clip workload outputs."),
    prompt: PromptKind = typer.Option(PromptKind.auto, help="Token-id prompts (exact length) or text; auto probes."),
    endpoint: Endpoint = typer.Option(Endpoint.completions, help="/v1/completions or /v1/chat/completions."),
    ignore_eos: bool = typer.Option(True, help="Send ignore_eos so outputs are exactly max_tokens long."),
    temperature: float = typer.Option(0.0, min=0.0, max=2.0),
    slo_ttft_ms: Optional[float] = typer.Option(None, min=0.0, help="TTFT SLO for attainment and goodput."),
    slo_tpot_ms: Optional[float] = typer.Option(None, min=0.0, help="TPOT SLO for attainment and goodput."),
    request_timeout: float = typer.Option(120.0, min=0.001, help="Seconds before a request counts as a timeout."),
    max_connections: int = typer.Option(256, min=1, help="Open connections at most."),
    warmup: int = typer.Option(0, min=0, help="Untimed requests first."),
    seed: int = typer.Option(0, help="Seed of the generated prompts."),
    out_path: Path = typer.Option(Path("bench-result.json"), "--out", "-o", help="Result JSON."),
    html: Optional[Path] = typer.Option(None, help="HTML report (default: --out with .html)."),
    label: Optional[str] = typer.Option(None, help="Name of this run in reports."),
    compare: Optional[tuple[Path, Path]] = typer.Option(None, help="Compare two result files (no run): A.json B.json."),
    serve_args: str = typer.Option("", help="Extra `planc serve` flags with --bundle, e.g. '--max-running 8'."),
    scrape_metrics: bool = typer.Option(True, help="Sample the server's queue from its /metrics during the run."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Replay a workload against a server and report TTFT, TPOT, throughput, errors and SLOs per variant and tenant."""
    if compare:
        if url or bundle:
            raise PlancError("--compare reads two result files and runs nothing; drop --url/--bundle")
        return compare_files(compare[0], compare[1], html)
    if (url is None) == (bundle is None):
        raise PlancError("give exactly one of --url (a running server) or --bundle (started for the run)")
    if workload is None and concurrency is None:
        raise PlancError("give --workload (open loop from its arrival times) or --concurrency (closed loop)")
    from planc.bench.config import make_config, parse_pairs, parse_tenant
    from planc.bench.run import BenchPlan

    tenants = [parse_tenant(t) for t in tenant or []]
    if bundle is not None and not tenants:
        tenants = bundle_tenants(bundle)
    wl = None
    if workload is not None:
        from planc.workload import load_workload

        wl = apply_overrides(load_workload(workload), time_scale, max_rows, parse_pairs(model_map or [], "--model-map"),
                             parse_pairs(weights or [], "--weights", number=True), max_prompt_tokens, max_output_tokens)
    settings = dict(mode="closed" if concurrency else "open", concurrency=concurrency or 1, max_requests=num_requests,
                    duration_s=duration, request_timeout_s=request_timeout, max_connections=max_connections,
                    endpoint=endpoint.value, prompt=prompt.value, ignore_eos=ignore_eos, temperature=temperature,
                    tenants=tenants, slo_ttft_ms=slo_ttft_ms, slo_tpot_ms=slo_tpot_ms, warmup=warmup, seed=seed,
                    scrape_metrics=scrape_metrics)
    meta = {"workload": str(workload) if workload else f"fixed {prompt_tokens}+{output_tokens} tokens"}
    chosen = [v.strip() for v in variants.split(",") if v.strip()] if variants else None
    label = label or (bundle.name if bundle else url)
    make_config(url=url or "http://127.0.0.1", label=label, **settings)  # bad settings fail before a server starts

    def run_against(target: str) -> dict:
        plan = BenchPlan(make_config(url=target, label=label, **settings), wl, None, (prompt_tokens, output_tokens),
                         chosen, meta)
        return _run_and_show(plan, progress)

    if bundle is not None:
        from planc.bench.server import LocalServer

        meta["bundle"] = str(bundle)
        with LocalServer(bundle, serve_args) as served_url:
            result = run_against(served_url)
    else:
        result = run_against(url)
    _write(result, out_path, html or out_path.with_suffix(".html"))


def _run_and_show(plan, progress: bool) -> dict:
    from planc.bench.console import LiveProgress
    from planc.bench.run import run_bench

    with LiveProgress(err, enabled=progress) as bar:
        return run_bench(plan, on_start=bar.start, on_done=bar.done)


def _write(result: dict, json_path: Path, html_path: Path) -> None:
    from planc.bench.console import results_table
    from planc.bench.html import report_html
    from planc.bench.result import write_result

    wide.print(results_table(result))
    write_result(json_path, result)
    html_path.parent.mkdir(parents=True, exist_ok=True)
    html_path.write_text(report_html(result), encoding="utf-8")
    out.print(f"wrote {json_path} and {html_path}", markup=False)
