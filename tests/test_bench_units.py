"""planc.bench without a server: percentiles on known series, summaries, SSE parsing, tenants,
result files (a simulator's shape included), charts and workload overrides."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest

from planc.bench.client import _Stream
from planc.bench.cli import apply_overrides
from planc.bench.config import make_config, parse_pairs, parse_tenant
from planc.bench.html import compare_html, report_html
from planc.bench.loadgen import parse_queue
from planc.bench.metrics import cdf, group_summary, percentiles, summarize_result, throughput_series
from planc.bench.result import RequestRecord, load_result, write_result
from planc.bench.svg import Series, line_chart, nice_ticks
from planc.errors import PlancError
from planc.workload import BurstGPTWorkload, Fixed, GammaWorkload, round_robin


def test_percentiles_of_a_known_series():
    p = percentiles(float(i) for i in range(1, 101))  # 1..100: rank r at (n-1)q interpolates linearly
    assert p["n"] == 100 and p["mean"] == 50.5 and p["max"] == 100.0
    assert p["p50"] == pytest.approx(50.5) and p["p90"] == pytest.approx(90.1)
    assert p["p95"] == pytest.approx(95.05) and p["p99"] == pytest.approx(99.01)
    assert percentiles([7.0]) == {"n": 1, "mean": 7.0, "p50": 7.0, "p90": 7.0, "p95": 7.0, "p99": 7.0, "max": 7.0}
    assert percentiles([]) is None and percentiles([None]) is None
    rng = np.random.default_rng(0)
    xs = rng.exponential(10.0, size=1001)
    assert percentiles(xs)["p99"] == pytest.approx(np.sort(xs)[990])  # (1001-1)*0.99 is an exact rank


def _rec(i: int, ttft_ms: float, tpot_ms: float, tokens: int = 10, status: str = "ok", variant: str = "a",
         tenant: str | None = None, start: float = 0.0) -> RequestRecord:
    ok = status == "ok"
    e2e = (ttft_ms + tpot_ms * (tokens - 1)) / 1e3
    return RequestRecord(id=i, variant=variant, tenant=tenant, arrival_s=start, start_s=start, prompt_tokens=5,
                         max_tokens=tokens, status=status, http_status=200 if ok else {"4xx": 403}.get(status),
                         output_tokens=tokens if ok else 0, ttft_s=ttft_ms / 1e3 if ok else None,
                         tpot_s=tpot_ms / 1e3 if ok else None, e2e_s=e2e if ok else 0.001,
                         itl_s=[tpot_ms / 1e3] * (tokens - 1) if ok else [])


def test_group_summary_counts_errors_throughput_and_slo():
    records = [_rec(i, ttft_ms=10.0 * (i + 1), tpot_ms=5.0 + i) for i in range(10)]  # TTFT 10..100 ms, TPOT 5..14
    records += [_rec(10, 0, 0, status="4xx"), _rec(11, 0, 0, status="timeout")]
    g = group_summary(records, duration_s=2.0, slo={"ttft_ms": 50.0, "tpot_ms": 8.0})
    assert (g["requests"], g["completed"], g["failed"]) == (12, 10, 2)
    assert g["errors"] == {"4xx": 1, "timeout": 1} and g["status_codes"] == {"200": 10, "403": 1}
    assert g["output_tokens"] == 100 and g["output_tokens_per_s"] == 50.0 and g["requests_per_s"] == 5.0
    assert g["ttft_ms"]["n"] == 10 and g["ttft_ms"]["p50"] == pytest.approx(55.0)  # failures do not count
    assert g["itl_ms"]["n"] == 90
    # within both SLOs: TTFT <= 50 (i = 0..4) and TPOT <= 8 (i = 0..3): 4 of the 12 sent
    assert g["slo_attainment"] == pytest.approx(4 / 12) and g["goodput_requests_per_s"] == 2.0
    assert group_summary(records, 2.0, {})["slo_attainment"] is None


def test_summary_groups_add_up_and_time_series():
    records = [_rec(i, 20, 5, variant="ab"[i % 2], tenant=["t1", "t2", None][i % 3], start=0.1 * i) for i in range(12)]
    s = summarize_result(records, {})
    assert sum(g["requests"] for g in s["summary"]["by_variant"].values()) == 12
    assert sum(g["requests"] for g in s["summary"]["by_tenant"].values()) == 8  # untenanted requests are in no tenant
    assert s["duration_s"] == pytest.approx(1.1 + 0.065)
    ts = throughput_series(records, 0.25)
    assert sum(ts["output_tokens_per_s"]) * 0.25 == pytest.approx(120)  # every token lands in one bin
    assert sum(ts["requests_per_s"]) * 0.25 == pytest.approx(12)
    xs, ys = cdf([3.0, 1.0, 2.0])
    assert xs == [1.0, 1.0, 2.0, 3.0] and ys[0] == 0.0 and ys[-1] == 1.0


def _feed(lines: list[str]) -> RequestRecord:
    r = RequestRecord(id=0, variant="a", tenant=None, arrival_s=0, start_s=0, prompt_tokens=3, max_tokens=4)
    s = _Stream(r, time.perf_counter())
    for line in lines:
        if not s.feed(line):
            break
    s.close(time.perf_counter())
    return r


def _chunk(text: str, finish=None) -> str:
    return "data: " + json.dumps({"choices": [{"text": text, "finish_reason": finish}]})


def test_sse_stream_parsing_counts_tokens_from_usage():
    usage = "data: " + json.dumps({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4}})
    r = _feed([_chunk("a"), "", _chunk("b"), _chunk(""), _chunk("c", "length"), usage, "data: [DONE]"])
    assert r.ok and r.output_tokens == 4 and len(r.itl_s) == 2 and r.ttft_s <= r.e2e_s
    assert r.tpot_s == pytest.approx(sum(r.itl_s) / 3)  # 4 tokens in 3 text chunks: TPOT uses the token count
    no_usage = _feed([_chunk("a"), _chunk("b", "stop"), "data: [DONE]"])
    assert no_usage.ok and no_usage.output_tokens == 2
    err = _feed([_chunk("a"), "data: " + json.dumps({"error": {"message": "engine failed"}})])
    assert err.status == "stream" and err.error == "engine failed"
    cut = _feed([_chunk("a")])  # the server went away before finishing
    assert cut.status == "stream" and "ended before" in cut.error


def test_parse_queue_reads_planc_and_vllm_gauges():
    planc_page = "# HELP planc_requests_waiting x\nplanc_requests_waiting 3.0\nplanc_requests_running 5.0\n"
    vllm_page = 'vllm:num_requests_waiting{model_name="m"} 2.0\nvllm:num_requests_running{model_name="m"} 7.0\n'
    assert parse_queue(planc_page) == {"waiting": 3.0, "running": 5.0}
    assert parse_queue(vllm_page) == {"waiting": 2.0, "running": 7.0}
    assert parse_queue("other_metric 1\n") is None


def test_tenant_and_pair_parsing():
    t = parse_tenant("acme=ACME_KEY:legal,chat")
    assert (t.name, t.api_key_env, t.variants) == ("acme", "ACME_KEY", ("legal", "chat"))
    assert t.sends("legal") and not t.sends("base")
    assert parse_tenant("open=").api_key_env is None and parse_tenant("ops=OPS").variants is None
    assert parse_tenant("ops=OPS").api_key({"OPS": "k"}) == "k"
    with pytest.raises(PlancError, match="OPS .*not set"):
        parse_tenant("ops=OPS").api_key({})
    with pytest.raises(PlancError, match="NAME=ENVVAR"):
        parse_tenant("acme:legal")
    assert parse_pairs(["a=3,b=1", "c=0.5"], "--weights", number=True) == {"a": 3.0, "b": 1.0, "c": 0.5}
    with pytest.raises(PlancError, match="--weights 'a=x'"):
        parse_pairs(["a=x"], "--weights", number=True)
    with pytest.raises(PlancError, match="bench settings: url"):
        make_config(url="localhost:8000")
    with pytest.raises(PlancError, match="concurrency"):
        make_config(url="http://x", concurrency=0)


def test_result_file_round_trip_and_simulator_shape(tmp_path):
    records = [_rec(i, 20 + i, 5, variant="ab"[i % 2]) for i in range(6)]
    measured = {"schema": "planc.bench/1", "meta": {"label": "measured"}, "slo": {"ttft_ms": None, "tpot_ms": None},
                **summarize_result(records, {}), "records": records}
    write_result(tmp_path / "m.json", measured)
    back = load_result(tmp_path / "m.json")
    assert back["summary"]["overall"]["ttft_ms"] == pytest.approx(measured["summary"]["overall"]["ttft_ms"])
    assert [r.ttft_s for r in back["records"]] == pytest.approx([r.ttft_s for r in records])
    # a simulator that predicts per-request times writes only requests; the summary is derived
    sim = {"schema": "planc.bench/1", "meta": {"source": "simulated"},
           "requests": [{"variant": "a", "ttft_s": 0.02, "tpot_s": 0.004, "e2e_s": 0.06, "output_tokens": 10}]}
    (tmp_path / "sim.json").write_text(json.dumps(sim))
    s = load_result(tmp_path / "sim.json")
    assert s["summary"]["overall"]["ttft_ms"]["p50"] == pytest.approx(20.0) and s["meta"]["label"] == "sim"
    # one that predicts only percentiles writes a summary; the comparison draws CDFs through them
    only = {"schema": "planc.bench/1", "meta": {"label": "pred"}, "summary": {"overall": back["summary"]["overall"]}}
    (tmp_path / "p.json").write_text(json.dumps(only))
    page = compare_html(back, load_result(tmp_path / "p.json"))
    assert page.count("<svg") == 4 and "pred" in page
    assert "<svg" in report_html(back) and "Errors" not in report_html(back)


@pytest.mark.parametrize("body, match", [
    ("[1]", "expected a JSON object"),
    ('{"schema": "other/2", "requests": []}', "schema"),
    ('{"schema": "planc.bench/1", "requests": [{"variant": "a", "status": "weird"}]}', "requests.0.status"),
    ('{"schema": "planc.bench/1"}', "needs `requests` or `summary`"),
    ("{not json", "not JSON"),
])
def test_bad_result_files_are_one_clear_error(tmp_path, body, match):
    (tmp_path / "bad.json").write_text(body)
    with pytest.raises(PlancError, match=match) as exc:
        load_result(tmp_path / "bad.json")
    assert "bad.json" in str(exc.value)


def test_charts_cover_their_data():
    assert nice_ticks(0, 161)[-1] >= 161 and nice_ticks(0, 161)[0] == 0
    assert nice_ticks(0.2, 0.9)[-1] >= 0.9
    svg = line_chart([Series("x", [1, 10, 1000], [0, 0.5, 1], step=True)], "t", "ms", "f", log_x=True)
    assert svg.count("<polyline") == 1 and ">1k<" in svg
    assert "no data" in line_chart([], "t", "x", "y")


def test_workload_overrides_and_round_robin(tmp_path):
    gamma = GammaWorkload(rate=2.0, num_requests=5, prompt_tokens=Fixed(value=4), output_tokens=Fixed(value=4))
    faster = apply_overrides(gamma, 0.5, 8, {}, {"a": 1.0}, None, 2)
    assert faster.rate == 4.0 and faster.num_requests == 8 and faster.variants == {"a": 1.0}
    assert faster.max_output_tokens == 2
    with pytest.raises(PlancError, match="model-map"):
        apply_overrides(gamma, None, None, {"ChatGPT": "a"}, {}, None, None)
    trace = BurstGPTWorkload(path=tmp_path / "t.csv", model_map={"GPT-4": "b"})
    t = apply_overrides(trace, 0.1, 3, {"ChatGPT": "a"}, {}, 16, None)
    assert (t.time_scale, t.max_rows, t.model_map, t.max_prompt_tokens) == (0.1, 3, {"GPT-4": "b", "ChatGPT": "a"}, 16)
    reqs = round_robin(["a", "b"], 5, 8, 3)
    assert [r.variant for r in reqs] == ["a", "b", "a", "b", "a"] and {r.arrival_s for r in reqs} == {0.0}
