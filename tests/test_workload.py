"""planc.workload: synthetic Gamma arrivals and BurstGPT replay."""
from __future__ import annotations

import numpy as np
import pytest

from planc.errors import SpecError
from planc.workload import BurstGPTWorkload, GammaWorkload, LogNormal, Uniform, load_workload, read_burstgpt

HEADER = "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"


def _gamma(**kw):
    base = dict(rate=10.0, cv=1.0, num_requests=4000, prompt_tokens=Uniform(low=4, high=12),
                output_tokens=LogNormal(mean=50, cv=0.5, max=400))
    base.update(kw)
    return GammaWorkload(**base)


@pytest.mark.parametrize("cv", [0.5, 1.0, 3.0])
def test_gamma_arrivals_have_the_requested_rate_and_cv(cv):
    reqs = _gamma(cv=cv).requests(["a", "b"])
    gaps = np.diff([r.arrival_s for r in reqs])
    assert reqs[0].arrival_s == 0.0 and (gaps >= 0).all()
    assert abs(1 / gaps.mean() - 10.0) / 10.0 < 0.1
    assert abs(gaps.std() / gaps.mean() - cv) / cv < 0.15


def test_lengths_follow_their_distributions_and_clipping():
    reqs = _gamma(max_output_tokens=60).requests(["a"])
    prompts = np.array([r.prompt_tokens for r in reqs])
    outputs = np.array([r.output_tokens for r in reqs])
    assert prompts.min() == 4 and prompts.max() == 12
    assert outputs.max() == 60 and outputs.min() >= 1
    unclipped = np.array([r.output_tokens for r in _gamma().requests(["a"])])
    assert abs(unclipped.mean() - 50) / 50 < 0.05


def test_variant_weights_and_determinism():
    wl = _gamma(variants={"a": 3, "b": 1}, seed=7)
    reqs = wl.requests(["a", "b", "c"])
    share = sum(r.variant == "a" for r in reqs) / len(reqs)
    assert abs(share - 0.75) < 0.03 and not any(r.variant == "c" for r in reqs)
    assert reqs == wl.requests(["a", "b", "c"])
    assert reqs != _gamma(variants={"a": 3, "b": 1}, seed=8).requests(["a", "b", "c"])
    with pytest.raises(SpecError, match="unknown variants"):
        _gamma(variants={"zzz": 1}).requests(["a"])


def test_burstgpt_replay_scales_time_maps_models_and_skips_failures(tmp_path):
    trace = tmp_path / "trace.csv"
    trace.write_text(HEADER + "\n".join([
        "100,ChatGPT,10,20,30,Conversation log",
        "102,GPT-4,5,0,5,Conversation log",      # failed: 0 response tokens
        "104,GPT-4,7,9,16,API log",
        "110,Other,3,4,7,API log",
    ]) + "\n")
    wl = BurstGPTWorkload(path=trace, time_scale=0.5, model_map={"ChatGPT": "legal", "GPT-4": "chat"})
    reqs = wl.requests(["legal", "chat", "base"])
    assert [r.arrival_s for r in reqs] == [0.0, 2.0, 5.0]
    assert [(r.variant, r.prompt_tokens, r.output_tokens) for r in reqs[:2]] == [("legal", 10, 20), ("chat", 7, 9)]
    assert reqs[2].variant in {"legal", "chat", "base"} and reqs == wl.requests(["legal", "chat", "base"])
    assert len(BurstGPTWorkload(path=trace, max_rows=2).requests(["x"])) == 2


def test_burstgpt_hash_mapping_spreads_rows(tmp_path):
    trace = tmp_path / "t.csv"
    trace.write_text(HEADER + "".join(f"{i},ChatGPT,10,10,20,API log\n" for i in range(400)))
    reqs = BurstGPTWorkload(path=trace).requests(["a", "b", "c", "d"])
    counts = {v: sum(r.variant == v for r in reqs) for v in "abcd"}
    assert all(60 < c < 140 for c in counts.values()), counts


@pytest.mark.parametrize("text, match", [
    ("Time,Model\n1,x\n", "missing columns"),
    (HEADER + "abc,ChatGPT,1,2,3,API log\n", ":2: Timestamp"),
    (HEADER, "no usable rows"),
])
def test_bad_trace_is_one_clear_error(tmp_path, text, match):
    trace = tmp_path / "bad.csv"
    trace.write_text(text)
    with pytest.raises(SpecError, match=match):
        read_burstgpt(trace)


def test_load_workload_from_yaml_and_csv(tmp_path):
    (tmp_path / "t.csv").write_text(HEADER + "0,ChatGPT,3,4,7,API log\n")
    (tmp_path / "replay.yaml").write_text("kind: burstgpt\npath: t.csv\ntime_scale: 2\n")
    assert load_workload(tmp_path / "replay.yaml").path == tmp_path / "t.csv"
    assert load_workload(tmp_path / "t.csv").kind == "burstgpt"
    (tmp_path / "g.yaml").write_text("kind: gamma\nrate: 2\nnum_requests: 5\n"
                                     "prompt_tokens: {dist: fixed, value: 3}\noutput_tokens: {dist: empirical, values: [1, 2]}\n")
    assert len(load_workload(tmp_path / "g.yaml").requests(["a"])) == 5
    (tmp_path / "bad.yaml").write_text("kind: gamma\nrate: -1\nnum_requests: 5\n"
                                       "prompt_tokens: {dist: fixed, value: 3}\noutput_tokens: {dist: fixed, value: 3}\n")
    with pytest.raises(SpecError, match="bad.yaml: rate"):
        load_workload(tmp_path / "bad.yaml")
