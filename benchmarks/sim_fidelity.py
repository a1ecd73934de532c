"""Simulator fidelity (issue 4): planc's serving simulator vs what planc's runtime measures, same workload.

For each model (the tiny example, 4 variants; the ~100M Llama with 8 variants of serve_load.py) one
seeded Gamma workload (open loop) is
- simulated: `planc.simulate` on `SimModel.from_bundle` with the local CPU profile (`planc profile`: its
  matmul table and the overheads and table scale fitted on live engine runs of its calibration models, and
  planc serve's costs measured on a real server: its own CPU and what it costs the engine thread), once as
  the engine alone and once inside `planc serve`;
- measured on the engine in this process (requests submitted at their arrival times, tokens timed
  in the engine's sink): the runtime alone, what the simulator models;
- measured over HTTP: `planc serve` in a child process driven by `planc bench`'s load generator
  (streaming /v1/completions, token-id prompts, ignore_eos): what a client sees.
Both use the server's engine settings (`--kv-cache-mb 64`, one thread). Compared: TPOT p50/p95,
TTFT p50/p95 and output tokens/s; error = simulated / measured - 1.

With --refit each measured run is predicted with a profile re-fitted on live calibration runs right
before it (a minute old when the run starts) and, as a check of how far the machine drifted during
the run, with one re-fitted right after it. A speed probe (speed_probe.py: a ~8-ms pass of streaming, small
torch ops and Python every second, in a child process) runs beside every calibration and every measured
run, all pinned to one CPU (--cpu; the machine's speed drifts per CPU); "before+probe" is the
"before" profile with its times scaled by the probe's mean during the run over its mean during that
calibration: the same fit, at the speed of the run's own minutes. --repeat N measures each run N times
back to back, so that the machine's own run-to-run spread stands beside the simulation's error.

    OMP_NUM_THREADS=1 python benchmarks/sim_fidelity.py [--models tiny,100m] [--modes engine,http]
        [--profile PATH] [--reprofile] [--refit] [--repeat N] [--quick] [--resimulate]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import pickle
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serve_load as sl  # noqa: E402  (its builders make the inputs and bundles)
from speed_probe import SpeedProbe  # noqa: E402

OUT = sl.OUT
# Per model: Gamma arrivals (rate req/s, cv) and lengths. Rates keep each engine busy with batches of
# several sequences from several variants, below saturation, for one to two minutes.
WORKLOADS = {
    "tiny": dict(rate=6.0, cv=2.0, num_requests=400, prompt_tokens={"dist": "uniform", "low": 16, "high": 96},
                 output_tokens={"dist": "uniform", "low": 16, "high": 96}),
    "100m": dict(rate=0.5, cv=2.0, num_requests=60, prompt_tokens={"dist": "uniform", "low": 16, "high": 96},
                 output_tokens={"dist": "uniform", "low": 16, "high": 64}),
}
VARIANTS = {"tiny": None, "100m": sl.PARTIAL_100M + sl.LORA_100M}
KV_MB = 64
FIGURES = (("tpot_ms", "p50"), ("tpot_ms", "p95"), ("ttft_ms", "p50"), ("ttft_ms", "p95"),
           ("output_tokens_per_s", None))


def workload(model: str, quick: bool):
    from planc.workload import GammaWorkload

    w = dict(WORKLOADS[model])
    if quick:
        w["num_requests"] = max(10, w["num_requests"] // 6)
    return GammaWorkload(seed=0, **w)


def engine_settings(bundle):
    from planc.runtime.server import ServeOptions, engine_config

    return engine_config(bundle, ServeOptions(kv_cache_mb=KV_MB, threads=1))


def speed_scaled(device, factor: float):
    """`device` on a machine `factor` times slower (>1) or faster (<1) throughout: every fitted time (table
    scale, overheads, planc serve's terms) times `factor`, peak and bandwidth divided by it. Used with the
    speed probe's ratio, run over calibration, to predict a run with the speed of its own minutes."""
    over = device.overheads
    update = {"overheads": over.model_copy(update={k: v * factor for k, v in over.model_dump().items()}),
              "peak_tflops": {k: v / factor for k, v in device.peak_tflops.items()},
              "mem_bw_gbps": device.mem_bw_gbps / factor}
    if device.matmul_table is not None:
        update["matmul_table"] = device.matmul_table.model_copy(update={"scale": device.matmul_table.scale * factor})
    return device.model_copy(update=update)


# ---------------------------------------------------------------- the three runs
def simulated(bundle, requests, cost_model, mode: str) -> dict:
    """The simulator's prediction of `mode`: the engine alone, or inside planc serve (server=True)."""
    from planc.sim_model import SimModel
    from planc.sim_report import bench_result
    from planc.simulate import simulate

    start = time.perf_counter()
    label = "simulated (planc serve)" if mode == "http" else "simulated (engine)"
    result = simulate(SimModel.from_bundle(bundle), cost_model, requests, engine_settings(bundle),
                      server=mode == "http")
    return bench_result(result, label, meta={"simulate_s": time.perf_counter() - start})


def measured_engine(bundle, requests) -> dict:
    """The runtime alone: requests submitted at their arrival times from this thread, tokens timed in the sink."""
    import torch
    from planc.bench.client import prompt_ids
    from planc.bench.config import make_config
    from planc.bench.metrics import summarize_result
    from planc.bench.result import SCHEMA, RequestRecord
    from planc.runtime.engine import Engine
    from planc.runtime.sampling import SamplingParams

    torch.set_num_threads(1)
    engine, ids_config = Engine(bundle, engine_settings(bundle)), make_config(url="http://unused")
    # untimed warm-up, one request per variant, as bench sends
    _wait_all(engine, [engine_submit(engine, name, list(range(3, 19)), 4, lambda e: None) for name in bundle.variants])
    steps = record_steps(engine)
    times: dict[int, list[float]] = {i: [] for i in range(len(requests))}
    done = threading.Event()
    left = [len(requests)]

    def sink_for(i: int):
        def sink(event) -> None:
            if event.token_id is not None:
                times[i].append(time.perf_counter())
            if event.finished:
                left[0] -= 1
                if not left[0]:
                    done.set()
        return sink

    with engine.in_thread():
        t0 = time.perf_counter()
        for i, r in enumerate(requests):
            time.sleep(max(0.0, t0 + r.arrival_s - time.perf_counter()))
            engine.submit(r.variant, prompt_ids(i, r.prompt_tokens, ids_config),
                          SamplingParams(max_tokens=r.output_tokens, temperature=0.0, ignore_eos=True), sink_for(i))
        done.wait(600)
    records = []
    for i, r in enumerate(requests):
        ts = times[i]
        ok = len(ts) == r.output_tokens
        records.append(RequestRecord(
            id=i, variant=r.variant, tenant=None, arrival_s=r.arrival_s, start_s=r.arrival_s,
            prompt_tokens=r.prompt_tokens, max_tokens=r.output_tokens, status="ok" if ok else "5xx",
            output_tokens=len(ts), ttft_s=ts[0] - t0 - r.arrival_s if ts else None,
            tpot_s=(ts[-1] - ts[0]) / (len(ts) - 1) if len(ts) > 1 else None,
            e2e_s=ts[-1] - t0 - r.arrival_s if ts else None))
    return {"schema": SCHEMA, "meta": {"label": "engine", "source": "measured"}, "slo": {},
            **summarize_result(records, {}), "records": records, "steps": steps}


def measured_engine_child(model: str, bundle_dir: Path, quick: bool) -> dict:
    """`measured_engine` in a fresh child process (this script with --engine-child): the same fresh state as
    planc serve's process and `planc profile`'s, not this process's (its heap, its earlier models)."""
    with tempfile.TemporaryDirectory(prefix="sim-fidelity-") as tmp:
        out = Path(tmp) / "engine.pickle"
        cmd = [sys.executable, __file__, "--models", model, "--engine-child", str(out), "--bundle-dir", str(bundle_dir)] \
            + ["--quick"] * quick
        subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        return pickle.loads(out.read_bytes())


def record_steps(engine) -> list:
    """Log every step of `engine` (wrapping its instance's methods; the runtime is not changed): wall and
    CPU seconds, and the batch it ran as (variant, tokens, cached, tokens computed) per sequence."""
    log, batch = [], []
    forward, step = engine._forward, engine.step

    def logged_forward(work):
        batch[:] = [(s.variant, len(s.all_ids), s.num_computed, getattr(s, "scheduled", len(s.all_ids) - s.num_computed))
                    for s in work]
        return forward(work)

    def logged_step():
        batch.clear()
        w0, c0 = time.perf_counter(), time.thread_time()
        busy = step()
        if batch:
            log.append((time.perf_counter() - w0, time.thread_time() - c0, list(batch)))
        return busy
    engine._forward, engine.step = logged_forward, logged_step
    return log


def step_errors(bundle, steps: list, cost_model) -> dict:
    """Predicted vs measured time of the engine's own steps, for the same batches: the step-time model
    alone, apart from scheduling and queueing. Per kind (with a prefill or decode only) and batch size."""
    import numpy as np
    from planc.sim_model import SimModel
    from planc.simulate import step_time

    model = SimModel.from_bundle(bundle)
    pred = np.array([step_time(model, cost_model, b) for _, _, b in steps])
    wall, cpu = np.array([w for w, _, _ in steps]), np.array([c for _, c, _ in steps])
    size = np.array([len(b) for _, _, b in steps])
    prefill = np.array([any((x[3] if len(x) > 3 else x[1] - x[2]) > 1 for x in b) for _, _, b in steps])
    out = {"all": _bin(pred, wall, cpu, np.ones_like(prefill))}
    for name, kind in (("decode only", ~prefill), ("with prefill", prefill)):
        for lo, hi in ((1, 1), (2, 4), (5, 12), (13, 10_000)):
            m = kind & (size >= lo) & (size <= hi)
            if m.any():
                out[f"{name}, {lo}-{hi} seqs" if hi < 10_000 else f"{name}, {lo}+ seqs"] = _bin(pred, wall, cpu, m)
    return out


def _bin(pred, wall, cpu, m) -> dict:
    return {"steps": int(m.sum()), "measured_wall_ms": float(wall[m].mean() * 1e3),
            "measured_cpu_ms": float(cpu[m].mean() * 1e3), "predicted_ms": float(pred[m].mean() * 1e3),
            "error_vs_cpu": float(pred[m].sum() / cpu[m].sum() - 1)}


def engine_submit(engine, variant, ids, max_tokens, sink):
    from planc.runtime.sampling import SamplingParams

    finished = threading.Event()

    def wrapped(event):
        sink(event)
        if event.finished:
            finished.set()
    engine.submit(variant, ids, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True), wrapped)
    return finished


def _wait_all(engine, events) -> None:
    while not all(e.is_set() for e in events):
        engine.step()


def measured_http(bundle_dir: Path, requests, variants) -> tuple[dict, float]:
    """`planc serve` in a child process, `planc bench`'s open-loop load generator here; also the cores
    that other processes kept busy meanwhile. /metrics is not scraped: each render holds the server's GIL
    for ~27 ms, a cost per second of the scraper's interval (a deployment's own choice) that the
    simulator does not model, not a cost of serving the workload."""
    from planc.bench.config import make_config
    from planc.bench.run import BenchPlan, run_bench
    from planc.bench.server import LocalServer

    env = {"OMP_NUM_THREADS": "1"}
    server = LocalServer(bundle_dir, f"--threads 1 --kv-cache-mb {KV_MB}", env=env)
    with server as url:
        config = make_config(url=url, mode="open", max_requests=len(requests), duration_s=900,
                             request_timeout_s=600, prompt="ids", ignore_eos=True, warmup=len(variants),
                             label="planc serve", scrape_metrics=False)
        cpu, t0 = sl.cpu_now(server.proc.pid), time.perf_counter()
        result = run_bench(BenchPlan(config, requests=requests, variants=variants))
        return result, sl.other_load(cpu, server.proc.pid, time.perf_counter() - t0)


# ---------------------------------------------------------------- compare and report
def wait_quiet(max_wait_s: float, limit: float = 0.25) -> float:
    """Wait (at most `max_wait_s`) until other processes keep fewer than `limit` cores busy over two
    5-second windows in a row; returns the last window's figure. This VM is shared: runs made while
    others' tests run measure the contention, not planc."""
    deadline, calm, other = time.monotonic() + max_wait_s, 0, 0.0
    while time.monotonic() < deadline:
        before = sl.cpu_now()
        time.sleep(5)
        other = sl.other_load(before, 0, 5.0)
        calm = calm + 1 if other < limit else 0
        if calm >= 2:
            break
    return other


def figure(result: dict, name: str, q) -> float:
    g = result["summary"]["overall"]
    return g[name] if q is None else (g[name] or {}).get(q)


def figure_key(name: str, q) -> str:
    """A figure's name in the tables and JSON: `tpot_ms.p50`, `output_tokens_per_s`."""
    return f"{name}.{q}" if q else name


def compare(sim: dict, measured: dict) -> dict:
    out = {}
    for name, q in FIGURES:
        s, m = figure(sim, name, q), figure(measured, name, q)
        out[figure_key(name, q)] = {"simulated": s, "measured": m,
                                             "error": (s / m - 1) if s is not None and m else None}
    return out


def machine() -> dict:
    import torch

    git = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True).stdout.strip()
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "python": platform.python_version(), "torch": torch.__version__, "nproc": os.cpu_count(),
            "cpu": _cpu(), "affinity": sorted(os.sched_getaffinity(0)), "git": git, "command": " ".join([Path(sys.executable).name] + sys.argv)}


def _cpu() -> str:
    from planc.profile import cpu_name

    return cpu_name()


def print_table(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="simulator fidelity (error = simulated / measured - 1)")
    for col in ("model", "measured on", "run", "cost model", "figure", "measured", "simulated", "error", "other cores"):
        t.add_column(col, justify="left" if col in ("model", "measured on", "cost model", "figure") else "right")
    for row in rows:
        for key, c in row["compare"].items():
            err = "-" if c["error"] is None else f"{100 * c['error']:+.1f}%"
            t.add_row(row["model"], row["mode"], str(row.get("run", 1)), row["cost"], key, _fmt(c["measured"]),
                      _fmt(c["simulated"]), err, f"{row['other_cores']:.2f}")
    Console().print(t)


def report(model: str, mode: str, bundle, measured: dict, sims: dict, cost_models: dict, run: int = 1) -> list[dict]:
    """Rows comparing each simulation with the measured run (and its steps, when it logged them)."""
    steps = [(w, c, [tuple(x) for x in b]) for w, c, b in measured.pop("steps", None) or []]
    meta, rows = measured.get("meta", {}), []
    for name, sim in sims.items():
        rows.append({"model": model, "mode": mode, "run": run, "cost": name, "probe_ms": meta.get("probe_ms"),
                     "requests": measured["summary"]["overall"]["requests"],
                     "wall_s": meta.get("wall_s"), "attempts": meta.get("attempts"),
                     "other_cores": meta.get("other_cores", float("nan")), "workload": WORKLOADS[model],
                     "compare": compare(sim, measured), "simulate_s": sim["meta"]["simulate_s"],
                     "steps": step_errors(bundle, steps, cost_models[name]) if steps else None})
        if steps:
            print_steps(model, name, rows[-1]["steps"])
    print_table(rows)
    return rows


def print_steps(model: str, cost: str, bins: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"{model}, {cost}: engine steps, predicted vs measured for the same batches")
    for col in ("steps", "n", "measured wall ms", "measured CPU ms", "predicted ms", "error vs CPU"):
        t.add_column(col, justify="left" if col == "steps" else "right")
    for name, b in bins.items():
        t.add_row(name, str(b["steps"]), f"{b['measured_wall_ms']:.1f}", f"{b['measured_cpu_ms']:.1f}",
                  f"{b['predicted_ms']:.1f}", f"{100 * b['error_vs_cpu']:+.1f}%")
    Console().print(t)


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.1f}"


def reprofile(path: Path, wait_s: float, retries: int) -> dict:
    """`planc profile --out path` in a child process once the machine is quiet (the matmul table, planc serve's
    costs, and a first live fit); repeated when other processes kept more than 0.25 cores busy meanwhile.
    Returns the cores others kept busy and the speed probe's mean."""
    return _quiet_child([sys.executable, "-m", "planc.cli", "profile", "--out", str(path)], "profiling", wait_s,
                        retries)


def refit_child(base: Path, out: Path, calibration: Path, wait_s: float, retries: int) -> dict:
    """The live calibration alone (`planc.profile_calibrate.refit`, ~35 s) on the profile at `base`, written to
    `out`, in a child process: the overheads and table scales of the machine as it is now (its speed drifts
    by 10-50% within minutes here). Returns the cores others kept busy meanwhile and the speed probe's mean."""
    return _quiet_child([sys.executable, __file__, "--refit-child", str(base), str(out), str(calibration)],
                        "re-fitting", wait_s, retries)


def _quiet_child(cmd: list[str], what: str, wait_s: float, retries: int) -> dict:
    """Run `cmd` once the machine is quiet, again while others kept > 0.25 cores busy meanwhile, with the
    speed probe beside it: {"other_cores", "probe_ms"}."""
    for _ in range(retries + 1):
        print(f"{what} (others busy {wait_quiet(wait_s):.2f} cores before)", file=sys.stderr, flush=True)
        cpu, t0 = sl.cpu_now(), time.perf_counter()
        with SpeedProbe() as speed:
            subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL)
        other = sl.other_load(cpu, 0, time.perf_counter() - t0)
        print(f"  others kept {other:.2f} cores busy while {what}; probe {_fmt(speed.mean_ms)} ms", file=sys.stderr,
              flush=True)
        if other <= 0.25:
            break
    return {"other_cores": other, "probe_ms": speed.mean_ms, "probe_parts_ms": speed.parts_ms}


def _refit_in_child(base: Path, out: Path, calibration: Path) -> None:
    from planc.bundle import Bundle
    from planc.cluster import load_device
    from planc.profile import write_profile
    from planc.profile_calibrate import calibration_bundles, refit

    dirs = [calibration / "small" / "bundle", calibration / "wide" / "bundle"]
    if not all((d / "manifest.json").is_file() for d in dirs):
        dirs = calibration_bundles(calibration)
    device, fit = refit(load_device(str(base)), [Bundle.open(d) for d in dirs])
    write_profile(device.model_copy(update={"source": f"{device.source}; re-fitted at {time.strftime('%H:%M:%S')} "
                                            f"on {fit.num_steps} live steps (median error {100 * fit.rel_error:.1f}%; "
                                            f"{_rusage()})"}), out)


def _rusage() -> str:
    """This process's user and system CPU and page faults: a slow phase that is the kernel's shows in them."""
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return f"user {r.ru_utime:.1f} s, system {r.ru_stime:.1f} s, {r.ru_minflt} minor faults, {r.ru_nivcsw} preemptions"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--models", default="tiny,100m")
    p.add_argument("--modes", default="engine,http")
    p.add_argument("--profile", type=Path, default=None, help="device profile (default: the local one)")
    p.add_argument("--reprofile", action="store_true", help="measure the profile now (planc profile, in a child)")
    p.add_argument("--refit", action="store_true",
                   help="re-fit the profile's overheads and table scales on live calibration runs right before "
                        "each measured run (its prediction) and right after it (how far the machine drifted); "
                        "profiles written to OUT/sim_fidelity_profile_<model>_<mode>_{before,after}.yaml")
    p.add_argument("--quick", action="store_true", help="a sixth of the requests")
    p.add_argument("--out", type=Path, default=OUT / "sim_fidelity.json")
    p.add_argument("--wait-quiet", type=float, default=600, help="seconds to wait for a quiet machine before each run")
    p.add_argument("--resimulate", action="store_true",
                   help="measure nothing: compare new simulations with the measured runs saved by an earlier run")
    p.add_argument("--retries", type=int, default=2, help="runs repeated when others kept > 0.25 cores busy")
    p.add_argument("--repeat", type=int, default=1,
                   help="measure each run this many times back to back (the machine's own spread beside the error)")
    p.add_argument("--rounds", type=int, default=1,
                   help="measure every model and mode this many times, interleaved (tiny engine, tiny serve, 100m "
                        "engine, 100m serve, then again), each with its own fit right before it; pooled figures "
                        "compare all rounds' requests together")
    p.add_argument("--cpu", type=int, default=0,
                   help="pin this process, its children (engine, planc serve, calibrations) and the speed probe to "
                        "this CPU: the machine's speed drifts per CPU, and the probe sees the drift of its own "
                        "(-1: no pinning)")
    p.add_argument("--engine-child", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--bundle-dir", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--refit-child", type=Path, nargs=3, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    import torch
    from planc.bench.result import load_result, write_result
    from planc.bundle import Bundle
    from planc.cluster import LOCAL_PROFILE, load_device
    from planc.cost import CostModel

    torch.set_num_threads(1)
    if args.cpu >= 0 and not (args.engine_child or args.refit_child):
        os.sched_setaffinity(0, {args.cpu})  # inherited by every child started from here on
    if args.engine_child:  # measured_engine_child's child: measure, hand the result back, nothing else
        bundle = Bundle.open(args.bundle_dir)  # the parent's: not recompiled when a source changed meanwhile
        requests = workload(args.models, args.quick).requests(VARIANTS[args.models] or list(bundle.variants))
        measured = measured_engine(bundle, requests)
        measured["meta"]["rusage"] = _rusage()
        args.engine_child.write_bytes(pickle.dumps(measured))
        return
    if args.refit_child:
        _refit_in_child(*args.refit_child)
        return
    profile_path = (args.profile or LOCAL_PROFILE).expanduser()
    meta = {}
    if args.reprofile and not args.resimulate:
        meta["profile"] = reprofile(profile_path, args.wait_quiet, args.retries)
    profile = load_device(str(profile_path))
    rows, profiles, pool = [], {}, {}
    slots = [(model, mode) for model in args.models.split(",") for mode in args.modes.split(",")]
    inputs = {model: prepare(model, args.quick) for model in dict.fromkeys(m for m, _ in slots)}
    for rnd in range(1, args.rounds + 1):
        tag = f"_round{rnd}" if args.rounds > 1 else ""
        for model, mode in slots:
            bundle_dir, bundle, variants, requests = inputs[model]
            # with rounds, the next round's "before" fit shows the drift: no "after" fit
            whens = ("before", "after") if args.rounds == 1 else ("before",)
            fitted = {when: OUT / f"sim_fidelity_profile_{model}_{mode}{tag}_{when}.yaml" for when in whens}
            names = [f"sim_fidelity_{model}_{mode}{tag}{f'_run{i}' if i > 1 else ''}.json"
                     for i in range(1, args.repeat + 1)]
            fits_path = OUT / f"sim_fidelity_{model}_{mode}{tag}_fits.json"
            if args.resimulate:
                runs = [load_result(OUT / n) for n in names if (OUT / n).is_file()]
                fits = json.loads(fits_path.read_text()) if fits_path.is_file() else {}
            else:
                fits = {"profile": meta["profile"]} if "profile" in meta else {}
                if args.refit:
                    fits["before"] = refit_child(profile_path, fitted["before"], OUT / "sim_fidelity_calibration",
                                                 args.wait_quiet, args.retries)
                runs = [measure(model, mode, bundle_dir, requests, variants, args) for _ in range(args.repeat)]
                if args.refit and "after" in fitted:
                    fits["after"] = refit_child(profile_path, fitted["after"], OUT / "sim_fidelity_calibration",
                                                args.wait_quiet, args.retries)
                for name, measured in zip(names, runs):
                    write_result(OUT / name, measured)
                fits_path.write_text(json.dumps(fits, indent=1) + "\n")
            meta[f"{model}_{mode}{tag}"] = fits
            devices = {when: load_device(str(path)) for when, path in fitted.items()} if args.refit \
                else {"profile": profile}
            profiles.update({f"{model}_{mode}{tag}_{when}": d.model_dump(mode="json") for when, d in devices.items()})
            for run, measured in enumerate(runs, 1):
                probe = measured["meta"].get("probe_ms")
                scaled = {f"{when}+probe": speed_scaled(d, probe / fits[when]["probe_ms"]) for when, d in devices.items()
                          if probe and (fits.get(when) or {}).get("probe_ms")}
                cost_models = {when: CostModel(d, dtype_bytes=4) for when, d in {**devices, **scaled}.items()}
                sims = {when: simulated(bundle, requests, cm, mode) for when, cm in cost_models.items()}
                for when, sim in sims.items():
                    write_result(OUT / f"sim_fidelity_{model}_simulated_{mode}{tag}_{when}_run{run}.json", sim)
                rows += report(model, mode, bundle, measured, sims, cost_models, run if args.rounds == 1 else rnd)
                slot = pool.setdefault((model, mode), {"measured": [], "sims": {}})
                slot["measured"].append(measured)
                for when, sim in sims.items():
                    slot["sims"].setdefault(when, []).append(sim)
    pooled_rows = [pooled_row(model, mode, slot) for (model, mode), slot in pool.items()
                   if len(slot["measured"]) > 1]
    out = {"machine": machine(), "meta": meta, "profile": profile.model_dump(mode="json"), "profiles": profiles,
           "rows": rows, "pooled": pooled_rows}
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print_table(rows)
    if pooled_rows:
        print_pooled(pooled_rows)


def prepare(model: str, quick: bool):
    """The model's bundle (compiled once, shared), its variants and the seeded workload's requests."""
    from planc.bundle import Bundle

    spec = sl.tiny_spec() if model == "tiny" else sl.big_spec()
    bundle_dir = sl.bundle(model, spec, shared=True)
    bundle = Bundle.open(bundle_dir)
    variants = VARIANTS[model] or list(bundle.variants)
    return bundle_dir, bundle, variants, workload(model, quick).requests(variants)


def pooled(results: list[dict]) -> dict:
    """Several runs of one workload as one long run: their requests' latencies together, their output
    tokens over their summed durations. The machine's speed drifts between runs; pooled, the drift
    averages out and what stays is the simulator's own bias."""
    from planc.bench.metrics import group_summary

    records = [r for res in results for r in res["records"]]
    return {"summary": {"overall": group_summary(records, sum(res["duration_s"] for res in results), {})}}


def pooled_row(model: str, mode: str, slot: dict) -> dict:
    """Pooled measured runs against the pooled predictions (each run predicted with its own fit), and the
    measured runs' spread: each run's figure over the pooled one, min and max."""
    measured = pooled(slot["measured"])
    spread = {}
    for name, q in FIGURES:
        whole = figure(measured, name, q)
        each = [figure(m, name, q) for m in slot["measured"]]
        spread[figure_key(name, q)] = [min(each) / whole - 1, max(each) / whole - 1] if whole else None
    return {"model": model, "mode": mode, "runs": len(slot["measured"]), "spread": spread,
            "compare": {when: compare(pooled(sims), measured) for when, sims in slot["sims"].items()}}


def print_pooled(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="pooled over the rounds: simulated vs measured (spread: each measured run vs the pooled figure)")
    for col in ("model", "measured on", "runs", "figure", "measured", "spread of runs", "cost model", "simulated",
                "error"):
        t.add_column(col, justify="left" if col in ("model", "measured on", "figure", "cost model") else "right")
    for row in rows:
        for when, comp in row["compare"].items():
            for key, c in comp.items():
                lo, hi = row["spread"][key] or (None, None)
                spread = "-" if lo is None else f"{100 * lo:+.0f}%..{100 * hi:+.0f}%"
                err = "-" if c["error"] is None else f"{100 * c['error']:+.1f}%"
                t.add_row(row["model"], row["mode"], str(row["runs"]), key, _fmt(c["measured"]), spread, when,
                          _fmt(c["simulated"]), err)
    Console().print(t)


def measure(model: str, mode: str, bundle_dir: Path, requests, variants, args) -> dict:
    """One measured run (repeated up to args.retries times while other processes kept > 0.25 cores busy)."""
    for attempt in range(args.retries + 1):
        before = wait_quiet(args.wait_quiet)
        cpu, t0 = sl.cpu_now(), time.perf_counter()
        print(f"{model}: measuring on the {mode} ({len(requests)} requests; others busy {before:.2f} cores before)",
              file=sys.stderr, flush=True)
        with SpeedProbe() as speed:
            if mode == "engine":
                measured = measured_engine_child(model, bundle_dir, args.quick)
                other = sl.other_load(cpu, 0, time.perf_counter() - t0)
            else:
                measured, other = measured_http(bundle_dir, requests, variants)
        wall = time.perf_counter() - t0
        other = round(other - speed.cpu_s / wall, 3)  # the probe ran beside the run: ours, not another's
        print(f"  others kept {other:.2f} cores busy during the run; probe {_fmt(speed.mean_ms)} ms", file=sys.stderr,
              flush=True)
        if other <= 0.25:
            break
    measured["meta"].update(other_cores=other, wall_s=wall, attempts=attempt + 1, ended=time.time(),
                            probe_ms=speed.mean_ms, probe_parts_ms=speed.parts_ms, probe=speed.samples)
    return measured


if __name__ == "__main__":
    main()
