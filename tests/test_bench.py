"""planc bench against the real server on 127.0.0.1: a BurstGPT-format trace written here, closed
loop, tenants (a 403 counted as 4xx) with --bundle starting the server, and runs that must stop."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

import planc
from planc.bench.config import make_config
from planc.bench.run import BenchPlan, run_bench
from planc.cli import main
from planc.workload import GammaWorkload, Fixed, round_robin
from tests.serving import ServerProcess

HEADER = "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
ROWS = [  # (timestamp, model, request tokens, response tokens)
    (100.0, "ChatGPT", 12, 8), (100.4, "GPT-4", 20, 6), (100.9, "ChatGPT", 5, 0),  # 0 tokens: a failed row, skipped
    (101.2, "GPT-4", 9, 10), (101.3, "ChatGPT", 30, 4), (102.0, "Other", 7, 5), (102.1, "GPT-4", 14, 7),
    (102.8, "ChatGPT", 6, 9), (103.5, "Other", 11, 3), (104.0, "GPT-4", 8, 8), (104.2, "ChatGPT", 16, 6),
    (105.0, "Other", 10, 4),
]


@pytest.fixture(scope="module")
def server(tiny_bundle):
    srv = ServerProcess(tiny_bundle)
    yield srv
    assert srv.stop() == 0


@pytest.fixture
def trace(tmp_path) -> Path:
    path = tmp_path / "trace.csv"
    path.write_text(HEADER + "".join(f"{t},{m},{p},{o},{p + o},API log\n" for t, m, p, o in ROWS))
    return path


def _bench(*args: str) -> int:
    return main(["bench", *args, "--no-progress"])


def test_burstgpt_replay_counts_add_up(server, trace, tmp_path):
    out = tmp_path / "r.json"
    start = time.monotonic()
    assert _bench("--url", server.url, "-w", str(trace), "--time-scale", "0.2", "--model-map", "ChatGPT=legal",
                  "--model-map", "GPT-4=chat", "--slo-ttft-ms", "60000", "--out", str(out)) == 0
    assert time.monotonic() - start < 30
    r = json.loads(out.read_text())
    kept = [row for row in ROWS if row[3] > 0]
    assert r["counts"] == {"workload": len(kept), "sent": len(kept), "completed": len(kept), "failed": 0, "not_sent": 0}
    reqs = sorted(r["requests"], key=lambda q: q["id"])
    # the trace's lengths are sent exactly: token-id prompts, max_tokens + ignore_eos
    assert [(q["prompt_tokens"], q["output_tokens"]) for q in reqs] == [(p, o) for _, _, p, o in kept]
    assert r["meta"]["prompt"] == "ids"
    models = [m for _, m, _, _ in kept]
    assert all(q["variant"] == {"ChatGPT": "legal", "GPT-4": "chat"}.get(m, q["variant"]) for q, m in zip(reqs, models))
    assert [q["arrival_s"] for q in reqs] == pytest.approx([(t - 100.0) * 0.2 for t, _, _, _ in kept])
    assert all(q["start_s"] >= q["arrival_s"] - 1e-3 and 0 < q["ttft_s"] <= q["e2e_s"] for q in reqs)
    s = r["summary"]
    assert sum(g["requests"] for g in s["by_variant"].values()) == s["overall"]["requests"] == len(kept)
    assert s["overall"]["output_tokens"] == sum(o for _, _, _, o in kept)
    assert s["overall"]["slo_attainment"] == 1.0 and s["overall"]["ttft_ms"]["n"] == len(kept)
    assert r["timeline"]["server_waiting"] is not None  # planc exports its queue; bench samples it
    html = out.with_suffix(".html").read_text()
    assert html.count("<svg") == 6 and "legal" in html


def test_closed_loop_keeps_concurrency_and_compares(server, tmp_path, capsys):
    config = make_config(url=server.url, mode="closed", concurrency=2, max_requests=6, sample_interval_s=0.05)
    result = run_bench(BenchPlan(config, requests=round_robin(["base", "support"], 6, 8, 8)))
    assert result["counts"]["completed"] == 6 and max(result["timeline"]["in_flight"]) <= 2
    assert all(r.output_tokens == 8 for r in result["records"])
    # text prompts (servers without token-id prompts) and the chat endpoint: lengths as the server counted them
    for endpoint in ("completions", "chat"):
        config = make_config(url=server.url, mode="closed", max_requests=2, prompt="text", endpoint=endpoint)
        records = run_bench(BenchPlan(config, requests=round_robin(["chat"], 2, 6, 4)))["records"]
        assert all(r.ok and r.output_tokens == 4 and r.prompt_tokens >= 6 for r in records), records
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    assert _bench("--url", server.url, "-c", "1", "-n", "2", "--prompt-tokens", "4", "--output-tokens", "4",
                  "--out", str(a), "--label", "c1") == 0
    assert _bench("--url", server.url, "-c", "2", "-n", "4", "--prompt-tokens", "4", "--output-tokens", "4",
                  "--variants", "legal", "--out", str(b), "--label", "c2") == 0
    assert json.loads(b.read_text())["summary"]["by_variant"].keys() == {"legal"}
    assert _bench("--compare", str(a), str(b), "--html", str(tmp_path / "cmp.html")) == 0
    assert "c1 (A) vs c2 (B)" in capsys.readouterr().out and (tmp_path / "cmp.html").is_file()


def test_runs_stop_at_the_duration_and_timeouts_count(server):
    # 200 requests at 4/s would take 50 s; the duration cap ends it after 1 s
    slow = GammaWorkload(rate=4.0, num_requests=200, prompt_tokens=Fixed(value=4), output_tokens=Fixed(value=4))
    start = time.monotonic()
    result = run_bench(BenchPlan(make_config(url=server.url, duration_s=1.0), slow))
    c = result["counts"]
    assert time.monotonic() - start < 15
    assert 1 <= c["sent"] <= 12 and c["sent"] + c["not_sent"] == c["workload"] == 200
    assert c["completed"] + c["failed"] == c["sent"]
    # requests that cannot finish in time are cut at their timeout and counted as such
    config = make_config(url=server.url, mode="closed", concurrency=2, max_requests=2, request_timeout_s=0.3)
    start = time.monotonic()
    result = run_bench(BenchPlan(config, requests=round_robin(["base"], 2, 4, 200)))
    assert time.monotonic() - start < 10
    g = result["summary"]["overall"]
    assert g["errors"] == {"timeout": 2} and g["completed"] == 0 and result["counts"]["failed"] == 2


def test_ignore_eos_runs_past_the_eos_token(tiny_bundle, monkeypatch):
    """bench asks for exact output lengths with `ignore_eos`; the tiny models never emit their eos
    greedily, so make the 4th greedy token the eos and check the request runs past it anyway."""
    from planc.runtime.engine import Engine
    from planc.runtime.sampling import SamplingParams

    bundle = planc.Bundle.open(tiny_bundle)

    def generate(**params) -> tuple[list[int], str]:
        tokens, reasons = [], []

        def sink(event) -> None:
            if event.token_id is not None:
                tokens.append(event.token_id)
            if event.finished:
                reasons.append(event.finish_reason)

        engine = Engine(bundle)
        engine.submit("base", [5, 6, 7], SamplingParams(max_tokens=8, temperature=0.0, **params), sink)
        while engine.has_work():
            engine.step()
        return tokens, reasons[-1]

    free, reason = generate()
    assert reason == "length" and len(free) == 8
    monkeypatch.setattr(bundle, "eos_token_ids", lambda name: [free[3]])
    stopped, reason = generate()
    assert reason == "stop" and len(stopped) <= 4
    assert generate(ignore_eos=True) == (free, "length")


def test_bundle_mode_with_tenants_counts_403_as_4xx(tiny_example, tmp_path, monkeypatch):
    spec = tiny_example.parent / "bench_tenants.yaml"
    spec.write_text(tiny_example.read_text() + "tenants:\n  - {name: acme, api_key_env: BENCH_ACME, variants: [legal]}\n"
                    "  - {name: ops, api_key_env: BENCH_OPS}\n")
    bundle = planc.emit(planc.compile(planc.load(spec)), out=tmp_path / "bundle")
    monkeypatch.setenv("BENCH_ACME", "k-acme")
    monkeypatch.setenv("BENCH_OPS", "k-ops")
    out = tmp_path / "t.json"
    # acme sends legal (allowed) and base (not allowed: 403); ops sends support
    assert _bench("--bundle", str(bundle), "-c", "2", "-n", "6", "--prompt-tokens", "4", "--output-tokens", "4",
                  "--tenant", "acme=BENCH_ACME:legal,base", "--tenant", "ops=BENCH_OPS:support",
                  "--out", str(out)) == 0
    r = json.loads(out.read_text())
    assert r["counts"] == {"workload": 6, "sent": 6, "completed": 4, "failed": 2, "not_sent": 0}
    acme, ops = r["summary"]["by_tenant"]["acme"], r["summary"]["by_tenant"]["ops"]
    assert (acme["requests"], acme["completed"], acme["errors"], acme["status_codes"]) == \
        (4, 2, {"4xx": 2}, {"200": 2, "403": 2})
    assert (ops["requests"], ops["completed"], ops["failed"]) == (2, 2, 0)
    assert r["summary"]["by_variant"]["base"]["errors"] == {"4xx": 2}
    assert "Errors" in out.with_suffix(".html").read_text()
    assert not _serving(bundle)  # the server bench started is gone


def _serving(bundle: Path) -> bool:
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"serve" in cmd and str(bundle).encode() in cmd:
            return True
    return False


@pytest.mark.parametrize("args, message", [
    (["--url", "http://127.0.0.1:9", "-c", "1", "-n", "1"], "cannot reach http://127.0.0.1:9"),
    (["--url", "http://127.0.0.1:9", "-w", "missing.csv"], "missing.csv: no such file"),
    (["-c", "1"], "exactly one of --url"),
    (["--url", "http://127.0.0.1:9"], "--workload"),
    (["--url", "http://127.0.0.1:9", "-c", "1", "--tenant", "bad"], "NAME=ENVVAR"),
    (["--compare", "nope.json", "nope2.json"], "nope.json: no such file"),
])
def test_user_errors_are_one_line(args, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert _bench(*args) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1
