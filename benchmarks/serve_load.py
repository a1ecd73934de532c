"""Serving throughput (issue 3): `planc serve` vs per-model serving vs transformers `generate`.

- planc: `planc serve` on the normal bundle (blocks shared across variants, per-block batching);
- per_model: the same server on a bundle compiled with DedupePass(share_across_models=False) (plus
  a pass giving each block its own tensors): each variant its own full model, batched only within itself;
- transformers: `generate` per request, one at a time, in a child process; LoRA via peft merge.
Servers are real subprocesses on 127.0.0.1 (`--threads 1`, OMP_NUM_THREADS=1, the same
`--kv-cache-mb`), started and driven by `planc bench`'s library (planc.bench: LocalServer, the
closed-loop load generator, its metrics). Closed loop per concurrency: streaming /v1/completions,
--prompt-len token ids from bench's seeded generator (the transformers child uses the same ids),
temperature 0, ignore_eos, fixed max_tokens, round-robin over the variants, after one untimed
request per variant. TTFT = first SSE chunk with text; TPOT = (last - first) / (tokens - 1), as
planc bench defines them. Each level's bench result goes to out/serve_results/<model>-<system>-c<N>.json
(transformers: <model>-transformers.json), so `planc bench --compare A.json B.json` overlays any two.
Peak RSS = the server's own VmHWM (/proc/PID/status; reset by exec, unlike ru_maxrss).

Models: the tiny example (4 variants: base, partial, full, LoRA) and a ~100M Llama (hidden 768, 12
layers, 12/4 heads, intermediate 2048, vocab 16000, random weights) whose 8 variants (requests go
to these, not its base) are 6 partial fine-tunes (top 2 layers + norm + head) and 2 LoRA adapters
(rank 8, q/v). Its tokenizer is a 16000-word WordLevel one so that every output id decodes to text
and gets an SSE chunk (the tiny example's 512-token one decodes ids >= 512 to nothing).

    OMP_NUM_THREADS=1 python benchmarks/serve_load.py [--quick] [--models tiny,100m] [--levels 1,8,32]
"""
from __future__ import annotations

import argparse, datetime, hashlib, json, os, platform, shutil, subprocess, sys, time  # noqa: E401
from pathlib import Path

OUT = Path(__file__).resolve().parent / "out"
INPUTS, BUNDLES, RESULTS = OUT / "serve_inputs", OUT / "serve_bundles", OUT / "serve_results"
SHAPE_100M = dict(vocab_size=16000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                  num_attention_heads=12, num_key_value_heads=4, bos_token_id=0, eos_token_id=1, pad_token_id=2)
PARTIAL_100M, LORA_100M = [f"ft{i}" for i in range(1, 7)], ["lora1", "lora2"]
MB = 1e6
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


# ---------------------------------------------------------------- inputs and bundles
def tiny_spec() -> Path:
    d = INPUTS / "tiny"
    if not (d / ".done").is_file():
        shutil.rmtree(d, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "planc.cli", "example", "tiny", str(d)], check=True)
        (d / ".done").write_text("")
    return d / "model.yaml"


def word_tokenizer(d: Path, vocab: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    words = {"<s>": 0, "</s>": 1, "<pad>": 2, **{f"w{i}": i for i in range(3, vocab)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<s>", "</s>", "<pad>"])
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}))
    (d / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2}))


def big_spec() -> Path:
    """base + 6 partial fine-tunes + 2 LoRA adapters of the ~100M model, written once."""
    from planc.example.checkpoints import hf_config, perturb, random_state, top_layers, write_adapter, write_checkpoint
    root, cfg = INPUTS / "100m", hf_config("llama", **SHAPE_100M)
    if not (root / ".done").is_file():
        shutil.rmtree(root, ignore_errors=True)
        print("generating the 100m checkpoints (once)", file=sys.stderr, flush=True)
        state = random_state(cfg, seed=0)
        word_tokenizer(write_checkpoint(root / "base", cfg, state), SHAPE_100M["vocab_size"])
        for i, name in enumerate(PARTIAL_100M):
            write_checkpoint(root / name, cfg, perturb(state, top_layers(12, 2), seed=1 + i))
        for i, name in enumerate(LORA_100M):
            write_adapter(root / name, cfg, targets=("q_proj", "v_proj"), rank=8, alpha=16.0, seed=1000 + i)
        variants = [{"name": n, "path": f"./{n}"} for n in PARTIAL_100M] + [{"name": n, "adapter": f"./{n}"} for n in LORA_100M]
        (root / "model.yaml").write_text(json.dumps({"base": {"name": "base", "path": "./base"},
                                                     "variants": variants, "backend": "local"}) + "\n")
        (root / ".done").write_text("")
    return root / "model.yaml"


def compiler_digest() -> str:
    """Hash of the compiler's sources (not the runtime's) and of ours: cached bundles are rebuilt when they change."""
    import inspect, planc  # noqa: E401
    root = Path(planc.__file__).parent
    files = sorted(f for d in (root, root.parent / "passes") for f in d.rglob("*.py") if "runtime" not in f.parts)
    mine = [inspect.getsource(bundle).encode()]
    return hashlib.sha256(b"".join([f.read_bytes() for f in files] + mine)).hexdigest()[:16]


def bundle(model: str, spec: Path, shared: bool) -> Path:
    import planc
    from planc.passes import DedupePass
    out, digest = BUNDLES / f"{model}-{'shared' if shared else 'permodel'}", compiler_digest()
    if not (out / ".done").is_file() or (out / ".done").read_text() != digest:
        shutil.rmtree(out, ignore_errors=True)
        print(f"compiling {out.name}", file=sys.stderr, flush=True)
        passes = None if shared else ([p for p in planc.default_pipeline() if p.name != "dedupe"]
                                      + [DedupePass(share_across_models=False)])
        planc.emit(planc.compile(planc.load(spec), passes=passes), out=out)
        (out / ".done").write_text(digest)
    return out


# ---------------------------------------------------------------- the servers and the client
def cpu_now(pid: int = 0) -> tuple[float, float]:
    """(CPU seconds busy on the whole machine, CPU seconds of this process + `pid` + finished children)."""
    tick = os.sysconf("SC_CLK_TCK")
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    ours = sum(os.times()[:4])
    if pid:
        ours += sum(int(x) for x in Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[11:13]) / tick
    return (sum(fields) - fields[3] - fields[4]) / tick, ours


def other_load(before: tuple[float, float], pid: int, wall: float) -> float:
    """Cores kept busy by other processes (not the server, not us) meanwhile: 0 on a quiet machine."""
    after = cpu_now(pid)
    return round(((after[0] - before[0]) - (after[1] - before[1])) / wall, 3)


def vm(pid: int, key: str) -> float:
    line = next(ln for ln in Path(f"/proc/{pid}/status").read_text().splitlines() if ln.startswith(key + ":"))
    return int(line.split()[1]) * 1024 / MB


def bench_config(url: str, args, concurrency: int, requests: int, label: str):
    """The `planc bench` settings of one closed-loop level: ids prompts from bench's seeded generator,
    greedy, ignore_eos, a fixed max_tokens (so every system gets the same requests)."""
    from planc.bench.config import make_config
    return make_config(url=url, mode="closed", concurrency=concurrency, max_requests=requests, duration_s=args.cap_s,
                       request_timeout_s=600, prompt="ids", label=label, seed=0, scrape_metrics=False)


def level_figures(result: dict) -> dict:
    """The figures this script reports, from a bench result (latencies back in seconds)."""
    g = result["summary"]["overall"]
    if g["failed"]:
        raise SystemExit(f"{result['meta']['label']}: {g['failed']} requests failed: {g['errors']}")
    seconds = {f"{key}_{q}": g[f"{key}_ms"][q] / 1e3 for key in ("ttft", "tpot") for q in ("p50", "p95")}
    return {"requests": g["completed"], "tokens": g["output_tokens"], "wall_s": result["duration_s"],
            "tok_s": g["output_tokens_per_s"], **seconds,
            # tokens that decode to no text have no SSE chunk of their own
            "chunk_mismatch": sum(len(r.itl_s) + 1 != r.output_tokens for r in result["records"])}


def bench_server(path: Path, variants: list[str], args, levels: list[int], tag: str) -> dict:
    """Closed-loop levels against `planc serve` on `path`, driven by `planc bench`'s load generator;
    each level's bench result is kept in out/serve_results/ for `planc bench --compare`."""
    from planc.bench.result import write_result
    from planc.bench.run import BenchPlan, run_bench
    from planc.bench.server import LocalServer
    from planc.workload import round_robin

    server = LocalServer(path, f"--threads 1 --kv-cache-mb {args.kv_cache_mb}", env=ENV)
    with server as url:
        pid = server.proc.pid
        out = {"rss_after_start_mb": vm(pid, "VmRSS"), "levels": {}}
        warm = round_robin(variants, len(variants), args.prompt_len, 4)  # one untimed request per variant
        run_bench(BenchPlan(bench_config(url, args, len(variants), len(variants), "warm-up"), requests=warm))
        for c in levels:
            n = max(2 * c, args.min_requests)
            cpu, t0 = cpu_now(pid), time.perf_counter()
            result = run_bench(BenchPlan(bench_config(url, args, c, n, f"{tag} c={c}"),
                                         requests=round_robin(variants, n, args.prompt_len, args.max_tokens),
                                         meta={"bundle": str(path)}))
            write_result(RESULTS / f"{tag}-c{c}.json", result)
            r = level_figures(result)
            out["levels"][c] = {**r, "vmhwm_mb": vm(pid, "VmHWM"), "other_cores": other_load(cpu, pid, time.perf_counter() - t0)}
            print(f"  {path.name} c={c}: {r['tok_s']:.1f} tok/s, TPOT p50 {r['tpot_p50'] * 1e3:.1f} ms",
                  file=sys.stderr, flush=True)
        out["peak_rss_mb"] = vm(pid, "VmHWM")
    return out


# ---------------------------------------------------------------- transformers generate (child process)
def hf_child(spec: str, names: list[str], requests: int, prompt_len: int, max_tokens: int, out: str) -> None:
    """transformers `generate`, one request after another, recorded as `planc bench` request records
    (same prompts as bench sends; requests laid end to end, model loading not counted)."""
    import torch, yaml  # noqa: E401
    from transformers import AutoModelForCausalLM
    from transformers.generation.streamers import BaseStreamer
    from planc.bench.client import prompt_ids
    from planc.bench.metrics import summarize_result
    from planc.bench.result import SCHEMA, RequestRecord, write_result
    torch.set_num_threads(1)
    s, root = yaml.safe_load(Path(spec).read_text()), Path(spec).parent
    models = {s["base"]["name"]: (s["base"]["path"], None), **{v["name"]: (v.get("path"), v.get("adapter"))
                                                              for v in s["variants"]}}
    config = bench_config("http://transformers", argparse.Namespace(cap_s=86_400), 1, requests, "transformers")

    class Clock(BaseStreamer):  # put() gets the prompt, then each new token
        def __init__(self): self.times = []  # noqa: E704
        def put(self, value): self.times.append(time.perf_counter())  # noqa: E301,E704
        def end(self): pass  # noqa: E301,E704

    def generate(model, prompt, n, clock=None):
        x = torch.tensor([prompt])
        with torch.no_grad():
            model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                           streamer=clock, pad_token_id=0)

    records, clock_s = [], 0.0
    for vi, name in enumerate(names):
        path, adapter = models[name]
        model = AutoModelForCausalLM.from_pretrained(root / (path or s["base"]["path"]), dtype=torch.float32)
        if adapter:
            from peft import PeftModel
            model = PeftModel.from_pretrained(model, root / adapter).merge_and_unload()
        generate(model.eval(), prompt_ids(0, prompt_len, config), 4)  # untimed warm-up, as the servers get
        for i in range(vi, requests, len(names)):  # request i goes to variant i % len(names), as round_robin
            clock, t0 = Clock(), time.perf_counter()
            generate(model, prompt_ids(i, prompt_len, config), max_tokens, clock)
            t = clock.times[1:]
            records.append(RequestRecord(id=i, variant=name, tenant=None, arrival_s=0.0, start_s=clock_s,
                                         prompt_tokens=prompt_len, max_tokens=max_tokens, http_status=200,
                                         output_tokens=len(t), ttft_s=t[0] - t0, tpot_s=(t[-1] - t[0]) / (len(t) - 1),
                                         e2e_s=t[-1] - t0, itl_s=[b - a for a, b in zip(t, t[1:])]))
            clock_s += t[-1] - t0
        del model
    records.sort(key=lambda r: r.start_s)
    result = {"schema": SCHEMA, "meta": {"label": "transformers", "source": "measured", "mode": "sequential"},
              "slo": {}, **summarize_result(records, {}), "records": records,
              "counts": {"workload": len(records), "sent": len(records), "completed": len(records), "failed": 0,
                         "not_sent": 0}}
    write_result(Path(out), result)


def bench_hf(spec: Path, variants: list[str], args, tag: str) -> dict:
    from planc.bench.result import load_result
    n = max(args.min_requests, 2 * len(variants))
    cpu, t0 = cpu_now(), time.perf_counter()
    path = RESULTS / f"{tag}.json"
    proc = subprocess.run([sys.executable, __file__, "--hf-child", str(spec), ",".join(variants), str(n),
                           str(args.prompt_len), str(args.max_tokens), str(path)], capture_output=True, text=True, env=ENV)
    if proc.returncode:
        raise SystemExit(f"transformers baseline failed:\n{proc.stderr}")
    return {**level_figures(load_result(path)), "other_cores": other_load(cpu, 0, time.perf_counter() - t0)}


# ---------------------------------------------------------------- report
def targets(r: dict, levels: list[int]) -> dict:
    top, a, b, hf = max(levels), r["planc"], r["per_model"], r["transformers"]
    budget = r["unique_weight_mb"] + r["kv_cache_mb"] * 2**20 / MB + 300
    return {"rss_budget_mb": budget, "rss_ok": a["peak_rss_mb"] <= budget,
            "throughput_ratio": a["levels"][top]["tok_s"] / b["levels"][top]["tok_s"],
            "tpot_p95_ratio": a["levels"][top]["tpot_p95"] / b["levels"][top]["tpot_p95"],
            "batch1_decode_vs_hf": hf["tpot_p50"] / a["levels"][1]["tpot_p50"] if 1 in levels else None}


def print_tables(results: dict) -> None:
    from rich.console import Console
    from rich.table import Table
    ms = ("ttft_p50", "ttft_p95", "tpot_p50", "tpot_p95")
    t = Table(title="planc serve, closed-loop streaming load (TTFT/TPOT in ms; RSS = server VmHWM so far; "
                  "other = cores busy with other processes meanwhile, ~0 when the figures are clean)")
    for col in ("model", "system", "conc", "reqs", "out tok/s", "TTFT p50", "TTFT p95", "TPOT p50", "TPOT p95",
                "peak RSS MB", "other"):
        t.add_column(col, justify="right")
    for model, r in results.items():
        for system in ("planc", "per_model"):
            for c, x in r[system]["levels"].items():
                t.add_row(model, system, str(c), str(x["requests"]), f"{x['tok_s']:.1f}",
                          *(f"{x[k] * 1e3:.1f}" for k in ms), f"{x['vmhwm_mb']:.0f}", f"{x['other_cores']:.2f}")
        x = r["transformers"]
        t.add_row(model, "transformers", "1", str(x["requests"]), f"{x['tok_s']:.1f}", *(f"{x[k] * 1e3:.1f}" for k in ms), "-",
                  f"{x['other_cores']:.2f}")
    g = Table(*("model", "tok/s planc/per-model at max c (>= 2)", "p95 TPOT planc/per-model (<= 0.5)",
                "planc peak RSS / budget MB", "batch-1 decode speed planc/transformers (>= 0.9)"), title="issue 3 targets")
    for model, r in results.items():
        x, b1 = r["targets"], r["targets"]["batch1_decode_vs_hf"]
        g.add_row(model, f"{x['throughput_ratio']:.2f}", f"{x['tpot_p95_ratio']:.2f}",
                  f"{r['planc']['peak_rss_mb']:.0f} / {x['rss_budget_mb']:.0f}", "-" if b1 is None else f"{b1:.2f}")
    Console(width=200).print(t, g)


def machine() -> dict:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    git = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                         cwd=Path(__file__).parent).stdout.strip()
    return {"cpu": cpu, "nproc": os.cpu_count(), "git": git, "python": platform.python_version(),
            "platform": platform.platform(), "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}


def run_model(model: str, args, levels: list[int]) -> dict:
    spec = tiny_spec() if model == "tiny" else big_spec()
    shared, per = bundle(model, spec, True), bundle(model, spec, False)
    manifest = json.loads((shared / "manifest.json").read_text())
    served = [v["name"] for v in manifest["variants"]]
    variants = served if model == "tiny" else PARTIAL_100M + LORA_100M  # the 100m's base gets no requests
    r = {"served": served, "variants": variants, "kv_cache_mb": args.kv_cache_mb,
         "unique_weight_mb": manifest["totals"]["unique_param_bytes"] / MB,
         "per_model_weight_mb": json.loads((per / "manifest.json").read_text())["totals"]["unique_param_bytes"] / MB}
    for key, path in (("planc", shared), ("per_model", per)):
        print(f"{model}: {key}", file=sys.stderr, flush=True)
        r[key] = bench_server(path, variants, args, levels, f"{model}-{key}")
    print(f"{model}: transformers", file=sys.stderr, flush=True)
    r["transformers"] = bench_hf(spec, variants, args, f"{model}-transformers")
    r["targets"] = targets(r, levels)
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the tiny example only")
    ap.add_argument("--models", default="tiny,100m")
    ap.add_argument("--levels", default="1,8,32", help="concurrency levels")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--min-requests", type=int, default=16, help="requests per level: max(2 * concurrency, this)")
    ap.add_argument("--cap-s", type=float, default=120, help="no new request after this many seconds of a level")
    ap.add_argument("--kv-cache-mb", type=float, default=64, help="KV budget of both servers (MiB)")
    ap.add_argument("--out", type=Path, default=OUT / "serve_load.json")
    ap.add_argument("--hf-child", nargs=6, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.hf_child:
        spec, names, n, plen, mt, out = args.hf_child
        return hf_child(spec, names.split(","), int(n), int(plen), int(mt), out)
    models = ["tiny"] if args.quick else [m for m in args.models.split(",") if m]
    levels = [int(c) for c in args.levels.split(",")]
    t0 = time.perf_counter()
    results = {m: run_model(m, args, levels) for m in models}
    print_tables(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine(), "argv": sys.argv[1:], "seconds": time.perf_counter() - t0,
                                    "results": results}, indent=2) + "\n")
    print(f"wrote {args.out} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
