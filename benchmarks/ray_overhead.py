"""Ray backend overhead (issue 5): the tiny example served by the ray backend vs the local backend.

1. End to end, same run, same workload: `planc serve` on the tiny example compiled for the local
   backend (one process) and for the ray backend (an ingress replica running the engine, 2 stage
   actors with 0.25 CPU each, Serve's HTTP proxy, on a private Ray cluster on 127.0.0.1), each
   driven by `planc bench`'s closed-loop load generator: streaming /v1/completions, 32 token-id
   prompts, 32 output tokens (ignore_eos), greedy, round robin over the 4 variants, one untimed
   request per variant first. Output tokens/s and e2e/TTFT/TPOT p50/p95 per concurrency.
2. Where the time goes, without HTTP: one engine in this process steps the same decode batches
   (a) through 2 in-process stages, (b) through the same 2 stages as Ray actors (RemoteStage).
   RemoteStage's timings split a step into compute inside the actors, packing/unpacking here, and
   the rest: Ray's call (argument serialization, task submission, scheduling, transport, result).
3. The HTTP hop: GET /health through Serve's proxy and the ingress replica vs the local uvicorn;
   and the cores the idle server's process tree keeps busy (Ray's raylet, GCS, agents, Serve's
   controller and proxy poll even when no request runs).
Each level is run `--rounds` times per server (mean reported, each round kept in the JSON); step
times are the median of rounds that alternate local and ray.

    OMP_NUM_THREADS=1 python benchmarks/ray_overhead.py [--levels 1,8,32] [--requests 48]
"""
from __future__ import annotations

import argparse, datetime, json, os, platform, statistics, subprocess, sys, time  # noqa: E401
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # read when ray is imported: keep it on 127.0.0.1
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
OUT = Path(__file__).resolve().parent / "out"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
PROMPT, OUTPUT = 32, 32


def bundles() -> dict[str, Path]:
    """The tiny example (written once) compiled for each backend, no plan (the ray one: 2 stages)."""
    import planc
    inputs, out = OUT / "ray_inputs" / "tiny", {}
    if not (inputs / ".done").is_file():
        subprocess.run([sys.executable, "-m", "planc.cli", "example", "tiny", str(inputs)], check=True)
        (inputs / ".done").write_text("")
    program = planc.compile(planc.load(inputs / "model.yaml"))
    for backend in ("local", "ray"):
        out[backend] = planc.emit(program, backend=backend, out=OUT / "ray_bundles" / f"tiny-{backend}")
    return out


def tree_cpu_s(pid: int) -> float:
    """CPU seconds used so far by `pid` and every process below it."""
    tick, children, total = os.sysconf("SC_CLK_TCK"), {}, 0.0
    stats = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            children.setdefault(int(fields[1]), []).append(int(d.name))
            stats[int(d.name)] = (int(fields[11]) + int(fields[12])) / tick
    todo = [pid]
    while todo:
        p = todo.pop()
        total += stats.get(p, 0.0)
        todo += children.get(p, [])
    return total


def end_to_end(path: Path, levels: list[int], requests: int, rounds: int) -> dict:
    """Closed-loop levels against `planc serve` on `path` with planc bench; plus /health round trips and
    the idle server's CPU use."""
    import httpx
    from planc.bench.config import make_config
    from planc.bench.run import BenchPlan, run_bench
    from planc.bench.server import LocalServer
    from planc.workload import round_robin

    variants = ["base", "legal", "support", "chat"]
    server = LocalServer(path, "--threads 1", env=ENV, start_timeout_s=300)
    with server as url:
        def config(c: int, n: int, label: str):
            return make_config(url=url, mode="closed", concurrency=c, max_requests=n, request_timeout_s=600,
                               prompt="ids", label=label, seed=0, scrape_metrics=False)
        run_bench(BenchPlan(config(4, 4, "warm-up"), requests=round_robin(variants, 4, PROMPT, 4)))
        time.sleep(2)
        before = tree_cpu_s(server.proc.pid)
        time.sleep(5)
        out = {"idle_cores": (tree_cpu_s(server.proc.pid) - before) / 5, "levels": {}, "rounds": {}}
        for c in levels:
            n = max(requests, 2 * c)
            runs = []
            for r in range(rounds):
                g = run_bench(BenchPlan(config(c, n, f"{path.name} c={c} round {r}"),
                                        requests=round_robin(variants, n, PROMPT, OUTPUT)))["summary"]["overall"]
                if g["failed"]:
                    raise SystemExit(f"{path.name} c={c}: {g['failed']} requests failed: {g['errors']}")
                runs.append({"tok_s": g["output_tokens_per_s"], **{f"{k}_{q}_ms": g[f"{k}_ms"][q] for k in
                             ("e2e", "ttft", "tpot") for q in ("p50", "p95")}})
            out["rounds"][c] = runs
            out["levels"][c] = {k: statistics.mean(run[k] for run in runs) for k in runs[0]}
            print(f"  {path.name} c={c}: {out['levels'][c]['tok_s']:.1f} tok/s, "
                  f"e2e p95 {out['levels'][c]['e2e_p95_ms']:.0f} ms", file=sys.stderr, flush=True)
        hops = []
        with httpx.Client(timeout=10) as client:
            for _ in range(200):
                t0 = time.perf_counter()
                client.get(url + "/health")
                hops.append(time.perf_counter() - t0)
        out["health_ms"] = {"p50": statistics.median(hops) * 1e3, "p95": sorted(hops)[int(0.95 * len(hops))] * 1e3}
    return out


def step_anatomy(path: Path, batches: list[int], steps: int, rounds: int) -> dict:
    """Decode step time of one engine over 2 in-process stages vs the same 2 stages as Ray actors."""
    import torch
    from planc.backends.ray_app import start_stages
    from planc.backends.ray_launch import start_ray
    from planc.backends.ray_layout import RayLayout
    from planc.bundle import Bundle
    from planc.runtime.engine import Engine
    from planc.runtime.sampling import SamplingParams
    from planc.runtime.server import ServeOptions, engine_config
    from planc.runtime.stage import local_stages
    import ray
    import yaml

    torch.set_num_threads(1)
    bundle = Bundle.open(path)
    layout = RayLayout.from_json(yaml.safe_load((path / "serve_config.yaml").read_text())
                                 ["applications"][0]["args"]["layout"])
    config = engine_config(bundle, ServeOptions())
    config.stage_positions = [range(lo, hi) for lo, hi in layout.stages]
    started = start_ray(None, 0)
    try:
        remote = start_stages(bundle, layout, config, ServeOptions(), prefix="bench.")
        local = local_stages(bundle, config.kv_cache_bytes, config.page_size, positions=config.stage_positions)
        out = {}
        for b in batches:
            runs: dict[str, list[dict]] = {"local": [], "ray": []}
            for _ in range(rounds):  # alternate, so that a slow spell of the machine hits both
                for name, stages in (("local", local), ("ray", remote)):
                    runs[name].append(_decode_steps(Engine(bundle, config, stages=stages), b, steps, SamplingParams))
            row = {name: {k: statistics.median(run[k] for run in rs) for k in rs[0]} for name, rs in runs.items()}
            row["ray_calls_per_step"] = row["ray"].pop("calls_per_step")
            out[b] = row
            print(f"  batch {b}: local {row['local']['step_ms']:.2f} ms/step, ray {row['ray']['step_ms']:.2f} ms/step",
                  file=sys.stderr, flush=True)
        return out
    finally:
        if started:
            ray.shutdown()


def _decode_steps(engine, batch: int, steps: int, params_cls) -> dict:
    """Time `steps` decode rounds (every sequence one token): a round is one engine step with
    in-process stages, and several with pipelined remote ones (each step moves one lane one stage)."""
    variants = ["base", "legal", "support", "chat"]
    tokens = [0]

    def sink(event):
        tokens[0] += event.token_id is not None
    for i in range(batch):
        engine.submit(variants[i % 4], [3 + (7 * i + j) % 400 for j in range(PROMPT)],
                      params_cls(max_tokens=steps + 8, temperature=0.0, ignore_eos=True), sink)
    while tokens[0] < 2 * batch:  # admission, prefill and one decode: not timed
        engine.step()
    for s in engine.stages:
        if hasattr(s, "timings"):
            s.timings.calls, s.timings.total_s, s.timings.remote_s, s.timings.pack_s = 0, 0.0, 0.0, 0.0
    start_tokens = tokens[0]
    t0 = time.perf_counter()
    while tokens[0] - start_tokens < steps * batch:
        engine.step()
    wall = time.perf_counter() - t0
    rounds = (tokens[0] - start_tokens) / batch
    result = {"step_ms": wall / rounds * 1e3}
    timings = [s.timings for s in engine.stages if hasattr(s, "timings")]
    if timings:
        result["calls_per_step"] = sum(t.calls for t in timings) / rounds
        total = sum(t.total_s for t in timings)
        remote = sum(t.remote_s for t in timings)
        packing = sum(t.pack_s for t in timings)
        result.update({"in_stages_ms": total / rounds * 1e3, "in_actors_ms": remote / rounds * 1e3,
                       "pack_here_ms": packing / rounds * 1e3,
                       "ray_call_ms": (total - remote - packing) / rounds * 1e3,
                       "engine_rest_ms": (wall - total) / rounds * 1e3})
    for seq in list(engine.running) + list(engine.waiting):
        engine.abort(seq.id)
    while engine.has_work():  # lanes in flight come back before the next measurement
        engine.step()
    return result


def machine() -> dict:
    import ray, torch  # noqa: E401
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    mem = int(next(ln for ln in Path("/proc/meminfo").read_text().splitlines() if ln.startswith("MemTotal")).split()[1])
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gb": round(mem / 2**20, 1), "python": platform.python_version(),
            "torch": torch.__version__, "ray": ray.__version__, "commit": commit,
            "date": datetime.datetime.now().isoformat(timespec="seconds")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--levels", default="1,8,32")
    ap.add_argument("--requests", type=int, default=48, help="requests per level (at least 2 x concurrency)")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--steps", type=int, default=40, help="timed decode steps per batch size and round")
    ap.add_argument("--rounds", type=int, default=2, help="repeats of each level and step measurement")
    args = ap.parse_args()
    levels, batches = [int(x) for x in args.levels.split(",")], [int(x) for x in args.batches.split(",")]
    paths = bundles()
    result = {"machine": machine(), "command": "OMP_NUM_THREADS=1 python benchmarks/ray_overhead.py " + " ".join(
        sys.argv[1:]), "workload": {"prompt_tokens": PROMPT, "output_tokens": OUTPUT, "levels": levels,
                                    "requests_per_level": args.requests}}
    for backend in ("local", "ray"):
        print(f"end to end: {backend}", file=sys.stderr, flush=True)
        result[backend] = end_to_end(paths[backend], levels, args.requests, args.rounds)
    print("step anatomy", file=sys.stderr, flush=True)
    result["steps"] = step_anatomy(paths["ray"], batches, args.steps, max(3, args.rounds))
    OUT.mkdir(exist_ok=True)
    (OUT / "ray_overhead.json").write_text(json.dumps(result, indent=2) + "\n")
    print_summary(result)


def print_summary(r: dict) -> None:
    print(f"machine: {r['machine']}")
    print("conc | local tok/s | ray tok/s | ray/local | e2e p95 local | e2e p95 ray | TTFT p95 l/r | TPOT p95 l/r (ms)")
    for c, a in r["local"]["levels"].items():
        b = r["ray"]["levels"][c]
        print(f"{c:>4} | {a['tok_s']:11.1f} | {b['tok_s']:9.1f} | {b['tok_s'] / a['tok_s']:9.2f} | "
              f"{a['e2e_p95_ms']:13.0f} | {b['e2e_p95_ms']:11.0f} | {a['ttft_p95_ms']:.0f}/{b['ttft_p95_ms']:.0f} | "
              f"{a['tpot_p95_ms']:.1f}/{b['tpot_p95_ms']:.1f}")
    print(f"GET /health p50: local {r['local']['health_ms']['p50']:.2f} ms, ray {r['ray']['health_ms']['p50']:.2f} ms; "
          f"idle server cores: local {r['local']['idle_cores']:.3f}, ray {r['ray']['idle_cores']:.3f}")
    print("batch | local ms/step | ray ms/step | in actors | Ray calls | pack here | engine rest | calls/step")
    for b, row in r["steps"].items():
        x = row["ray"]
        print(f"{b:>5} | {row['local']['step_ms']:13.2f} | {x['step_ms']:11.2f} | {x['in_actors_ms']:9.2f} | "
              f"{x['ray_call_ms']:9.2f} | {x['pack_here_ms']:9.2f} | {x['engine_rest_ms']:11.2f} | "
              f"{row['ray_calls_per_step']:.1f}")


if __name__ == "__main__":
    main()
