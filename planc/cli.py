"""The `planc` command line. Errors in the user's input print one line and exit 1 (no traceback)."""
from __future__ import annotations

import importlib
import os
import sys
import time
from pathlib import Path
from typing import Optional

import click
import typer
from rich.console import Console

from planc.bench.cli import bench_cmd
from planc.errors import PlancError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="planc: compile a base model and its fine-tunes into a deduplicated block-chain bundle.")
example_app = typer.Typer(no_args_is_help=True, help="Write small, real example checkpoints.")
app.add_typer(example_app, name="example")
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False)


@app.command("compile")
def compile_cmd(
    spec: Path = typer.Argument(..., help="model.yaml"),
    out_dir: Path = typer.Option(Path("bundle"), "--out", "-o", help="Bundle directory to write (replaced atomically)."),
    backend: Optional[str] = typer.Option(None, help="Backend to emit for (default: model.yaml's `backend`)."),
    cluster: Optional[str] = typer.Option(None, help="Plan for this cluster and embed the plan (default: "
                                                     "model.yaml's plan.cluster; none: no plan)."),
    tune_kernels: bool = typer.Option(False, help="Time the Triton kernels' configs on this machine's GPU and "
                                                  "write the winners to kernels.json (CPU: records the torch path)."),
) -> None:
    """Trace, partition, fingerprint and dedupe the models of SPEC; plan it when a cluster is named;
    write a verified bundle."""
    import planc
    from planc.report import CompileProgress, compile_summary

    from planc.store import check_output_dir

    check_output_dir(out_dir)  # before any work: never discover at the end that --out is not ours
    start = time.perf_counter()
    with CompileProgress(err) as progress:
        program = planc.load(spec)
        ctx = progress.context()
        if cluster is not None:
            ctx.options.setdefault("cost", {})["cluster"] = cluster
        planned = bool(cluster or program.spec.plan.cluster)
        progress.start(program, planned=planned, extra=int(tune_kernels))
        passes = None
        if tune_kernels:
            from planc.passes import default_pipeline, plan_pipeline
            from planc.passes.tune_kernels import TuneKernelsPass

            passes = default_pipeline() + (plan_pipeline() if planned else []) + [TuneKernelsPass()]
            if planned:  # tune for the plan's device kind: a GPU cluster needs its GPU here
                from planc.cluster import load_cluster

                kind = load_cluster(cluster or program.spec.plan.cluster).device.kind
                ctx.options.setdefault("tune_kernels", {})["target"] = kind
        program = planc.compile(program, passes=passes, ctx=ctx)
        progress.writing(len(program.zoo) + len(program.adapter_zoo))
        bundle = planc.emit(program, backend=backend, out=out_dir, ctx=progress.context(), progress=progress.wrote)
    compile_summary(out, program, bundle, time.perf_counter() - start)


@app.command("plan")
def plan_cmd(
    spec: Path = typer.Argument(..., help="model.yaml"),
    cluster: Optional[str] = typer.Option(None, help="Cluster file or name (8xH100-80GB, 4x8xA100-80GB, local); "
                                                     "default: model.yaml's plan.cluster."),
    workload: Optional[Path] = typer.Option(None, help="Workload file (variant mix, lengths, rate)."),
    objective: Optional[str] = typer.Option(None, help="throughput | devices (default: model.yaml's)."),
    time_limit: Optional[float] = typer.Option(None, min=0.1, help="Solver seconds (default: plan.time_limit_s)."),
    seed: Optional[int] = typer.Option(None, min=0, help="Solver seed."),
    as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON instead of tables."),
    svg: Optional[Path] = typer.Option(None, help="Also write a picture of the placement (SVG)."),
    compare: bool = typer.Option(True, help="Also score a greedy packer and one replica per variant."),
    simulate: Optional[bool] = typer.Option(None, "--simulate/--no-simulate",
                                            help="Rank the best candidates and the baselines by simulating planc's "
                                                 "runtime (default: model.yaml's plan.simulate)."),
) -> None:
    """Choose TP/PP/DP and placement for SPEC on a cluster, without reading weights."""
    import json

    from planc.plan_report import placement_svg, print_plan
    from planc.planner import baselines, plan

    if objective not in (None, "throughput", "devices"):
        raise PlancError(f"--objective: expected throughput or devices, got {objective!r}")
    with err.status("planning"):
        program = plan(spec, cluster, workload, objective, time_limit, seed, simulate=simulate)
        simulated = simulate if simulate is not None else program.spec.plan.simulate
        base = baselines(program, simulate=simulated and objective != "devices") if compare else None
    result = program.plan
    cluster_obj = program.extras["plan_inputs"]["cluster"]
    usable = cluster_obj.device.usable_bytes / 1e9
    if svg is not None:
        svg.write_text(placement_svg(result, usable), encoding="utf-8")
    if as_json:
        out.print_json(json.dumps({**result.to_json(), "baselines": base}))
        return
    print_plan(out, result, cluster_obj.describe(), usable, base)


@app.command()
def inspect(bundle: Path = typer.Argument(..., help="Bundle directory"),
            verify: bool = typer.Option(True, help="Check every file's sha256 first.")) -> None:
    """Show what each variant's chain is made of and what is shared."""
    from planc.bundle import Bundle
    from planc.report import inspect_tables

    inspect_tables(out, Bundle.open(bundle, verify=verify))


@app.command()
def run(
    bundle: Path = typer.Argument(..., help="Bundle directory"),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Variant to run (default: the base)."),
    prompt: str = typer.Option("Once upon a time", "--prompt", "-p"),
    max_tokens: int = typer.Option(24, min=1, max=4096),
    temperature: float = typer.Option(0.0, min=0.0, help="0 = greedy."),
    seed: Optional[int] = typer.Option(None),
) -> None:
    """Run one completion request through a variant's chain (verifies the bundle first)."""
    from planc.bundle import Bundle
    from planc.generate import complete

    import torch

    torch.set_num_threads(1)  # small CPU matmuls are slower with more threads
    b = Bundle.open(bundle)
    name = model or next(iter(b.variants))
    result = complete(b, name, prompt, max_tokens, temperature, seed)
    out.print(f"[bold]{name}[/bold] ({len(result.prompt_ids)} prompt tokens, {len(result.output_ids)} generated, "
              f"finish: {result.finish_reason})")
    out.print(prompt + result.text, markup=False)


@app.command()
def serve(
    bundle: Path = typer.Argument(..., help="Bundle directory"),
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    port: int = typer.Option(8000, min=0, max=65535, help="Port (0 picks a free one)."),
    kv_cache_mb: Optional[float] = typer.Option(None, min=0.01, help="KV cache memory (default: the bundle's)."),
    max_running: Optional[int] = typer.Option(None, min=1, help="Sequences decoding at once."),
    max_queue: Optional[int] = typer.Option(None, min=1, help="Waiting requests before HTTP 429."),
    max_model_len: Optional[int] = typer.Option(None, min=1, help="Longest prompt + completion."),
    max_batch_tokens: Optional[int] = typer.Option(None, min=1, help="Tokens per engine step; longer prompts are "
                                                   "prefilled in chunks (default: the bundle's, else 512 on a "
                                                   "CPU, 2048 on a GPU)."),
    threads: int = typer.Option(1, min=1, help="Engine intra-op threads."),
    shutdown_timeout: float = typer.Option(30.0, min=0, help="Seconds in-flight requests get after SIGTERM."),
    kernels: Optional[str] = typer.Option(None, help="Op implementations: auto, torch, triton, or op=impl pairs "
                                          "(rms_norm=torch,decode_attention=triton). Default: $PLANC_KERNELS, "
                                          "else auto."),
    address: Optional[str] = typer.Option(None, help="Ray cluster to join (ray bundles only; default: start a "
                                                     "private one bound to 127.0.0.1)."),
    stage_timeout: Optional[float] = typer.Option(None, min=0, help="Seconds a restarting stage actor may take "
                                                  "before its requests get 503 (ray bundles; default 30)."),
    lanes: Optional[int] = typer.Option(None, min=1, help="Lanes of sequences in flight through pipelined stages "
                                        "(ray bundles; default: the count the planner chose for the bundle's "
                                        "plan, else one per stage)."),
) -> None:
    """Serve every variant of BUNDLE over an OpenAI-compatible HTTP API."""
    import socket

    from planc.bundle import Bundle
    from planc.runtime.server import ServeOptions, build_state, serve_forever

    opened = Bundle.open(bundle)
    options = ServeOptions(kv_cache_mb, max_running, max_queue, max_model_len, threads, kernels, stage_timeout,
                           max_batch_tokens, lanes)
    serve_with = _backend_server(opened)
    if serve_with is not None:  # e.g. the ray backend: stages in actors, its own HTTP front
        serve_with(opened, options, host, port, shutdown_timeout, address)
        out.print("planc: stopped", markup=False)
        return
    if address is not None:
        raise PlancError("--address applies to bundles compiled for the ray backend")
    state = build_state(opened, options)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        raise PlancError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    bound = sock.getsockname()[1]
    cfg = state.engine.config
    variants = ", ".join(f"{n} ({v['kind']})" for n, v in state.bundle.variants.items())
    out.print(f"planc serving {len(state.bundle.variants)} variants: {variants}", markup=False)
    out.print(f"  {state.engine.num_unique_blocks} unique blocks loaded; KV cache {state.engine.kv_pages()} pages x "
              f"{cfg.page_size} tokens ({cfg.kv_cache_bytes / 2**20:.0f} MiB); max_model_len {cfg.max_model_len}",
              markup=False)
    plan = state.bundle.plan
    widest = max((p.tp for p in plan.placements), default=1) if plan is not None else 1
    if widest > 1:
        out.print(f"  note: the plan lays copies out at TP up to {widest}; this backend runs every copy whole in one "
                  "process (the ray backend runs each rank in its own actor)", markup=False)
    if state.keys is None:
        out.print("  tenants: none configured; the server is open to every client (no API keys)", markup=False)
    else:
        out.print(f"  tenants: {len(state.keys)} API keys", markup=False)
    out.print(f"  listening on http://{host}:{bound}  (OpenAI API at /v1, /health, /metrics)", markup=False)
    sys.stdout.flush()
    serve_forever(state, sock, shutdown_timeout)
    out.print("planc: stopped", markup=False)


def _backend_server(bundle):
    """The bundle's backend's own `serve`, if it has one (the local backend runs here, in this process)."""
    from planc.backends import available_backends, get_backend

    name = bundle.manifest.get("backend", "local")
    return getattr(get_backend(name), "serve", None) if name in available_backends() else None


app.command("bench")(bench_cmd)  # defined in planc.bench.cli: its flags live beside the code they configure


@app.command("profile")
def profile_cmd(
    out_path: Path = typer.Option(Path("~/.cache/planc/local-profile.yaml"), "--out", "-o",
                                  help="Profile file to write (what `--cluster local` reads)."),
    quick: bool = typer.Option(False, help="Smaller measurements (~1 min instead of ~2 min), for tests."),
) -> None:
    """Measure this machine's CPU (matmul FLOP/s, memory bandwidth, planc's runtime overheads) into a profile."""
    from rich.table import Table

    from planc.profile import measure_local, profile_rows, write_profile

    with err.status("profiling this machine") as status:
        profile = measure_local(quick=quick, progress=lambda msg: status.update(f"profiling: {msg}"))
    path = write_profile(profile, out_path)
    table = Table(title=f"local profile ({path})", show_header=False)
    for name, value in profile_rows(profile):
        table.add_row(name, value)
    out.print(table)
    out.print(profile.source, markup=False)


@example_app.command("tiny")
def example_tiny(out_dir: Path = typer.Argument(Path("examples/tiny"), help="Directory to write into.")) -> None:
    """A few-MB Llama-style base, a partial and a full fine-tune, and a LoRA adapter, trained here."""
    from planc.example import write_tiny_example

    start = time.perf_counter()
    with err.status("writing the tiny example") as status:
        cfg = write_tiny_example(out_dir, progress=lambda msg: status.update(msg))
    losses = ", ".join(f"{k} {v[0]:.2f}->{v[-1]:.2f}" for k, v in cfg.losses.items())
    out.print(f"wrote {out_dir}/model.yaml and its checkpoints in {time.perf_counter() - start:.1f} s "
              f"(training loss {losses})", markup=False)


@app.command()
def version() -> None:
    """Print planc's version."""
    import planc

    out.print(planc.__version__)


def _typer_exceptions(name: str) -> tuple[type, ...]:
    """click's exception class `name`, and typer's own where typer bundles its click (typer >= 0.2x
    raises those, which click's classes do not catch)."""
    found = [getattr(click.exceptions, name)]
    for module in ("typer._click.exceptions", "typer.exceptions", "typer"):
        try:
            extra = getattr(importlib.import_module(module), name, None)
        except ImportError:
            continue
        if isinstance(extra, type) and extra not in found:
            found.append(extra)
    return tuple(found)


_USAGE_ERRORS = _typer_exceptions("ClickException")
_EXITS = _typer_exceptions("Exit")
_ABORTS = _typer_exceptions("Abort")


def main(argv: Optional[list[str]] = None) -> int:
    try:
        app(args=argv, prog_name="planc", standalone_mode=False)
    except PlancError as exc:
        sys.stderr.write(f"error: {exc}\n")
        if os.environ.get("PLANC_DEBUG"):
            raise
        return 1
    except _USAGE_ERRORS as exc:
        exc.show()
        return exc.exit_code
    except _EXITS as exc:
        return exc.exit_code
    except (*_ABORTS, KeyboardInterrupt):
        sys.stderr.write("interrupted\n")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
