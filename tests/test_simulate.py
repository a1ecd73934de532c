"""The serving simulator against hand-computed step times and the engine's scheduling rules.

Most cases use a device whose roofline terms are negligible (huge peak and bandwidth) and whose
overheads are round numbers, so every step lasts step_us + block_call_us per call + per_seq_us per
sequence in a block call, where the calls are the batched block calls, the adapter delta calls and
the attention calls of one sequence (each prefill in a layer, or a lone decode; two or more decodes
share one), and the expected times can be written down by hand.
"""
from __future__ import annotations

import pytest

from planc.cluster import DeviceProfile, Overheads
from planc.cost import BlockCost, CostModel
from planc.runtime.engine import EngineConfig
from planc.sim_model import SimModel, adapter_cost
from planc.simulate import simulate
from planc.workload import Fixed, GammaWorkload, Request

US = 1e-6
STEP, CALL, SEQ = 100.0, 10.0, 1.0


def overhead_only() -> CostModel:
    dev = DeviceProfile(name="t", kind="cpu", memory_gb=1, peak_tflops={"fp32": 1e12}, mem_bw_gbps=1e12,
                        overheads=Overheads(step_us=STEP, block_call_us=CALL, per_seq_us=SEQ))
    return CostModel(dev, dtype_bytes=4)


EMB = BlockCost("embedding", 0.0, weight_bytes=1e6, read_bytes_per_token=512, hidden_size=128)
LAYER = BlockCost("layer", 4e5, attn_flops_per_pair=512, kv_bytes_per_token=512.0, weight_bytes=7e5, hidden_size=128)
HEAD = BlockCost("head", 1.3e5, weight_bytes=2.6e5, hidden_size=128)


def model(chains: dict) -> SimModel:
    costs = {k: {"E": EMB, "L": LAYER, "H": HEAD}[k[0]] for c in chains.values() for k, _ in c}
    return SimModel.from_data(chains, costs)


ONE = model({"a": [("E", None), ("L0", None), ("L1", None), ("H", None)]})


def test_one_request_ttft_is_the_prefill_step_and_tpot_the_decode_step():
    r = simulate(ONE, overhead_only(), [Request(0.0, "a", 20, 5)]).requests[0]
    step = (STEP + 6 * CALL + 4 * SEQ) * US  # 4 block calls + 2 attention calls (one per layer); 4 slots
    assert r.status == "ok" and r.num_tokens == 5
    assert r.ttft_s == pytest.approx(step, rel=1e-6)
    assert r.tpot_s == pytest.approx(step, rel=1e-6)
    assert r.e2e_s == pytest.approx(5 * step, rel=1e-6)


def test_step_times_are_the_cost_models_block_times():
    """On a real roofline the prefill step is the sum of block_time over the chain; the head sees one row."""
    from planc.cluster import load_device

    cm = CostModel(load_device("A100-80GB"), dtype_bytes=2)
    r = simulate(ONE, cm, [Request(0.0, "a", 300, 2)]).requests[0]
    pairs = 300 * 301 / 2
    prefill = cm.step_overhead() + cm.block_time(EMB, prefill_tokens=300, attn_pairs=pairs, num_seqs=1) + \
        2 * cm.block_time(LAYER, prefill_tokens=300, attn_pairs=pairs, num_seqs=1) + \
        cm.block_time(HEAD, decode_seqs=1, num_seqs=1)
    decode = cm.step_overhead() + cm.block_time(EMB, decode_seqs=1, context_tokens=301, num_seqs=1) + \
        2 * cm.block_time(LAYER, decode_seqs=1, context_tokens=301, num_seqs=1) + \
        cm.block_time(HEAD, decode_seqs=1, num_seqs=1)
    attention = 2 * cm.device.overheads.block_call_us * 1e-6  # the sequence's own attention call in each layer
    prefill, decode = prefill + attention, decode + attention
    assert r.ttft_s == pytest.approx(prefill, rel=1e-9)
    assert r.tpot_s == pytest.approx(decode, rel=1e-9)


def test_variants_sharing_blocks_batch_together():
    shared = model({"a": [("E", None), ("L", None), ("Ha", None)], "b": [("E", None), ("L", None), ("Hb", None)]})
    separate = model({"a": [("Ea", None), ("La", None), ("Ha", None)], "b": [("Eb", None), ("Lb", None), ("Hb", None)]})
    reqs = [Request(0.0, "a", 8, 1), Request(0.0, "b", 8, 1)]
    t_shared = simulate(shared, overhead_only(), reqs).requests[0].ttft_s
    t_separate = simulate(separate, overhead_only(), reqs).requests[0].ttft_s
    # shared: E and L run once for both, each head once: 4 block calls; 2 prefill attention calls either way
    assert t_shared == pytest.approx((STEP + (4 + 2) * CALL + 6 * SEQ) * US, rel=1e-6)
    assert t_separate == pytest.approx((STEP + (6 + 2) * CALL + 6 * SEQ) * US, rel=1e-6)
    assert t_shared < t_separate


def test_block_batch_cap_splits_a_group():
    reqs = [Request(0.0, "a", 8, 1) for _ in range(5)]
    t = simulate(ONE, overhead_only(), reqs, EngineConfig(block_batch_cap=2)).requests[0].ttft_s
    # 3 block calls (2+2+1) per position, 5 prefill attention calls per layer, 5 slots per position
    assert t == pytest.approx((STEP + (4 * 3 + 2 * 5) * CALL + 4 * 5 * SEQ) * US, rel=1e-6)


def test_lora_adds_one_delta_call_per_adapter_on_the_shared_base():
    delta = adapter_cost([(8, 256.0)], dtype_bytes=4)
    m = SimModel.from_data({"a": [("E", None), ("L", None), ("H", None)], "b": [("E", None), ("L", "x"), ("H", None)],
                            "c": [("E", None), ("L", "y"), ("H", None)]}, {"E": EMB, "L": LAYER, "H": HEAD},
                           {"x": delta, "y": delta})
    reqs = [Request(0.0, v, 8, 1) for v in "abc"]
    t = simulate(m, overhead_only(), reqs).requests[0].ttft_s
    # 3 block calls + 3 prefill attention calls + 2 adapter delta calls; deltas add no per-sequence term
    assert t == pytest.approx((STEP + (3 + 3 + 2) * CALL + 9 * SEQ) * US, rel=1e-6)
    assert delta.linear_flops_per_token == 2 * 8 * 256


def test_max_running_admits_in_waves():
    reqs = [Request(0.0, "a", 8, 4) for _ in range(6)]
    out = simulate(ONE, overhead_only(), reqs, EngineConfig(max_running=2)).requests
    prefill = (STEP + (4 + 2 * 2) * CALL + 8 * SEQ) * US  # two prefill attention calls in each of 2 layers
    decode = (STEP + 4 * CALL + 8 * SEQ) * US  # the two decodes share the layer's batched attention
    waves = [(k + 1) * prefill + 3 * k * decode for k in range(3)]
    assert [r.first_token_s for r in out] == pytest.approx([w for w in waves for _ in range(2)], rel=1e-6)
    assert out[-1].finish_s == pytest.approx(3 * prefill + 9 * decode, rel=1e-6)


def test_max_batch_tokens_chunks_the_prompt_that_does_not_fit():
    reqs = [Request(0.0, "a", 60, 3), Request(0.0, "a", 60, 3)]
    out = simulate(ONE, overhead_only(), reqs, EngineConfig(max_batch_tokens=100)).requests
    two = (STEP + (4 + 2 * 2) * CALL + 8 * SEQ) * US  # both prefill in step 1 (60 + a 40-token chunk)
    assert out[0].first_token_s == pytest.approx(two, rel=1e-6)
    # step 2: the first one's decode (one token, first) and the second's last 20 prompt tokens
    assert out[1].first_token_s == pytest.approx(2 * two, rel=1e-6)
    both = simulate(ONE, overhead_only(), reqs, EngineConfig(max_batch_tokens=200)).requests
    assert both[0].first_token_s == both[1].first_token_s == pytest.approx(two, rel=1e-6)


def test_a_prompt_longer_than_the_budget_is_prefilled_over_several_steps():
    cm = overhead_only().device.model_copy(update={"overheads": Overheads(per_token_us=1.0)})
    r = simulate(ONE, CostModel(cm, 4), [Request(0.0, "a", 100, 2)], EngineConfig(max_batch_tokens=40)).requests[0]
    # chunks of 40, 40 and 20 tokens, each charged per token in the embedding and both layers (not the head)
    assert r.ttft_s == pytest.approx(3 * 100 * US, rel=1e-6)
    assert r.num_tokens == 2 and r.tpot_s == pytest.approx(0.0, abs=1e-12)


def test_decodes_take_their_token_before_a_new_prompt():
    """A running decode is never starved by a long prompt: it takes one token, the prompt the rest."""
    reqs = [Request(0.0, "a", 8, 6), Request(1e-4, "a", 500, 1)]
    out = simulate(ONE, overhead_only(), reqs, EngineConfig(max_batch_tokens=64)).requests
    alone = simulate(ONE, overhead_only(), reqs[:1], EngineConfig(max_batch_tokens=64)).requests[0]
    assert out[0].num_tokens == 6 and out[1].status == "ok"
    # every step of the first request still produces its token; steps got longer, not fewer
    assert out[0].tpot_s > alone.tpot_s and out[0].finish_s < out[1].first_token_s


def test_small_kv_budget_preempts_and_every_request_completes():
    # 2 KV layers x 512 B/token, page_size 16: one page is 8 KiB; 24 pages hold 12 pages per layer = 192 tokens
    reqs = [Request(0.001 * i, "a", 40, 40) for i in range(6)]
    res = simulate(ONE, overhead_only(), reqs, EngineConfig(kv_cache_bytes=24 * 16 * 512, page_size=16))
    assert res.num_pages == 24 and res.capacity_tokens == 192
    assert sum(r.num_preemptions for r in res.requests) > 0
    assert all(r.status == "ok" and r.num_tokens == 40 for r in res.requests)
    roomy = simulate(ONE, overhead_only(), reqs, EngineConfig(kv_cache_bytes=2**24))
    assert sum(r.num_preemptions for r in roomy.requests) == 0


def test_too_long_and_queue_full_are_refused_like_the_server():
    reqs = [Request(0.0, "a", 150, 60)] + [Request(0.0, "a", 8, 2) for _ in range(4)]
    res = simulate(ONE, overhead_only(), reqs, EngineConfig(kv_cache_bytes=24 * 16 * 512, max_queue=2))
    assert [r.status for r in res.requests] == ["rejected", "ok", "ok", "refused", "refused"]
    assert res.summary()["requests"]["ok"] == 2


def _overload(n: int = 300) -> list[Request]:
    w = GammaWorkload(rate=2000.0, cv=1.0, num_requests=n, prompt_tokens=Fixed(value=16), output_tokens=Fixed(value=32))
    return w.requests(["a"])


def test_deterministic():
    reqs = _overload()
    cfg = EngineConfig(max_running=8, kv_cache_bytes=32 * 16 * 512)
    a = simulate(ONE, overhead_only(), reqs, cfg).summary(slo_ttft_ms=50, slo_tpot_ms=1)
    b = simulate(ONE, overhead_only(), reqs, cfg).summary(slo_ttft_ms=50, slo_tpot_ms=1)
    assert a == b and a["preemptions"] > 0


def test_two_replicas_halve_queueing_under_overload():
    reqs = _overload()
    cfg = EngineConfig(max_running=4, max_queue=10_000)
    one = simulate(ONE, overhead_only(), reqs, cfg)
    two = simulate(ONE, overhead_only(), reqs, cfg, replicas=2)
    q1, q2 = one.summary()["ttft_ms"]["mean"], two.summary()["ttft_ms"]["mean"]
    assert q2 < 0.55 * q1
    assert {r.replica for r in two.requests} == {0, 1}
    assert two.summary()["throughput"]["requests_per_s"] > 1.8 * one.summary()["throughput"]["requests_per_s"]
    assert 0.9 < one.utilization() <= 1.0


def test_summary_percentiles_and_slo():
    reqs = [Request(0.0, "a", 8, 3), Request(10.0, "a", 8, 3)]
    s = simulate(ONE, overhead_only(), reqs).summary(slo_ttft_ms=1.0, slo_tpot_ms=0.1)
    step_ms = (STEP + 6 * CALL + 4 * SEQ) * 1e-3
    assert s["ttft_ms"]["p50"] == pytest.approx(step_ms) and s["tpot_ms"]["p99"] == pytest.approx(step_ms)
    assert s["slo"]["attainment"] == 0.0  # TPOT 0.164 ms > 0.1 ms
    assert s["throughput"]["output_tokens_per_s"] == pytest.approx(6 / (10.0 + 3 * step_ms * 1e-3))
    assert set(s["per_variant"]) == {"a"}


def test_from_bundle(tiny_bundle):
    from planc.bundle import Bundle

    bundle = Bundle.open(tiny_bundle)
    m = SimModel.from_bundle(bundle)
    assert set(m.variants) == set(bundle.variants)
    assert m.num_kv_layers == bundle.arch.num_layers
    arch = bundle.arch
    assert m.kv_bytes_per_token == 2 * arch.num_kv_heads * arch.head_dim * 4
    lora = next(n for n, v in bundle.variants.items() if v["kind"] == "lora")
    assert any(a is not None for _, a in m.chains[lora])
    res = simulate(m, overhead_only(), [Request(0.0, v, 12, 4) for v in m.variants])
    assert all(r.status == "ok" for r in res.requests)


def test_bench_result_is_planc_bench_schema(tmp_path):
    """A simulated run is written in planc bench's result schema and reads back with the same figures."""
    from planc.bench.result import SCHEMA, load_result, write_result
    from planc.sim_report import bench_result

    reqs = [Request(0.0, "a", 150, 60), Request(0.0, "a", 8, 3), Request(1.0, "a", 8, 3)]
    res = simulate(ONE, overhead_only(), reqs, EngineConfig(kv_cache_bytes=24 * 16 * 512))
    out = bench_result(res, "sim", slo_ttft_ms=1.0)
    write_result(tmp_path / "sim.json", out)
    back = load_result(tmp_path / "sim.json")
    assert back["schema"] == SCHEMA and back["meta"]["source"] == "simulated"
    overall = back["summary"]["overall"]
    assert (overall["completed"], overall["failed"], overall["status_codes"]) == (2, 1, {"200": 2, "400": 1})
    step_ms = (STEP + 6 * CALL + 4 * SEQ) * 1e-3
    assert overall["ttft_ms"]["p50"] == pytest.approx(step_ms, rel=1e-4)
    assert overall["slo_attainment"] == pytest.approx(2 / 3)
    assert back["counts"]["completed"] == 2


def test_bad_inputs_are_refused_with_a_clear_message():
    with pytest.raises(ValueError, match="same length"):
        SimModel.from_data({"a": [("E", None), ("L", None)], "b": [("E", None)]}, {"E": EMB, "L": LAYER})
    with pytest.raises(ValueError, match="no cost for block 'X'"):
        SimModel.from_data({"a": [("X", None)]}, {"E": EMB})
    with pytest.raises(ValueError, match="unknown"):
        simulate(ONE, overhead_only(), [Request(0.0, "nope", 8, 2)])


TOKEN, REQUEST = 30.0, 200.0


def served(**extra: float) -> CostModel:
    """overhead_only() plus planc serve's costs: its thread's per-token and per-request CPU (how late a
    request reaches the engine and a token the client) and what it costs the engine thread."""
    dev = overhead_only().device.model_copy(update={
        "overheads": Overheads(step_us=STEP, block_call_us=CALL, per_seq_us=SEQ, server_token_us=TOKEN,
                               server_request_us=REQUEST, **extra)})
    return CostModel(dev, dtype_bytes=4)


TOLL, REQUEST_TOLL = 700.0, 3000.0


def test_the_server_delays_requests_and_tokens_by_its_own_work():
    step = (STEP + 6 * CALL + 4 * SEQ) * US
    engine = simulate(ONE, served(), [Request(0.0, "a", 20, 5)], server=False).requests[0]
    assert engine.ttft_s == pytest.approx(step) and engine.tpot_s == pytest.approx(step)
    http = simulate(ONE, served(), [Request(0.0, "a", 20, 5)]).requests[0]
    # parsed (REQUEST) before the engine sees it; each token streamed (TOKEN) before the client sees it
    assert http.ttft_s == pytest.approx((REQUEST + TOKEN) * US + step)
    assert http.tpot_s == pytest.approx(step)


def test_the_engine_pays_the_servers_toll_in_the_step_that_runs_while_it_streams():
    step = (STEP + 6 * CALL + 4 * SEQ) * US
    cm = served(engine_token_us=TOLL, engine_request_us=REQUEST_TOLL)
    engine = simulate(ONE, cm, [Request(0.0, "a", 20, 5)], server=False).requests[0]
    assert engine.ttft_s == pytest.approx(step) and engine.tpot_s == pytest.approx(step)
    http = simulate(ONE, cm, [Request(0.0, "a", 20, 5)]).requests[0]
    # the prefill step pays for the request's parsing, every decode step for streaming the token before it
    assert http.ttft_s == pytest.approx((REQUEST + REQUEST_TOLL + TOKEN) * US + step)
    assert http.tpot_s == pytest.approx(step + TOLL * US)


def test_the_toll_grows_with_the_tokens_streamed_per_step():
    reqs = [Request(0.0, "a", 8, 20) for _ in range(32)]
    cm = served(engine_token_us=TOLL)
    engine = simulate(ONE, cm, reqs, server=False).summary()["tpot_ms"]["p50"]
    http = simulate(ONE, cm, reqs).summary()["tpot_ms"]["p50"]
    assert http == pytest.approx(engine + 32 * TOLL * 1e-3, rel=1e-6)


def test_the_step_toll_is_paid_once_per_step_that_streams_however_many_tokens():
    """The server wakes once per step to stream its tokens: 32 decodes per step pay engine_step_us once, where
    engine_token_us is paid 32 times; a lone sequence pays both once per step."""
    reqs = [Request(0.0, "a", 8, 20) for _ in range(32)]
    cm = served(engine_step_us=TOLL)
    engine = simulate(ONE, cm, reqs, server=False).summary()["tpot_ms"]["p50"]
    http = simulate(ONE, cm, reqs).summary()["tpot_ms"]["p50"]
    assert http == pytest.approx(engine + TOLL * 1e-3, rel=1e-6)
    both = served(engine_step_us=TOLL, engine_token_us=7.0)
    lone = simulate(ONE, both, [Request(0.0, "a", 20, 5)]).requests[0]
    step = (STEP + 6 * CALL + 4 * SEQ) * US
    assert lone.tpot_s == pytest.approx(step + (TOLL + 7.0) * US)


def test_a_step_that_samples_nothing_wakes_no_server():
    """A long prompt prefilled over three steps streams its first token after the third: only the step after
    that one pays the step toll (the first and second sampled nothing)."""
    engine = EngineConfig(max_batch_tokens=16, page_size=16)
    base = simulate(ONE, served(), [Request(0.0, "a", 40, 3)], engine).requests[0]
    tolled = simulate(ONE, served(engine_step_us=TOLL), [Request(0.0, "a", 40, 3)], engine).requests[0]
    assert tolled.ttft_s == pytest.approx(base.ttft_s)
    assert tolled.e2e_s == pytest.approx(base.e2e_s + 2 * TOLL * US)


def batched(**ov: float) -> CostModel:
    dev = overhead_only().device.model_copy(update={"overheads": Overheads(**ov)})
    return CostModel(dev, dtype_bytes=4)


def test_two_or_more_decodes_in_a_call_pay_the_batched_decode_call_instead_of_a_lone_attention_call():
    from planc.simulate import step_time

    cm = batched(step_us=STEP, block_call_us=CALL, decode_call_us=77.0)
    one = step_time(ONE, cm, [("a", 30, 29)])
    two = step_time(ONE, cm, [("a", 30, 29), ("a", 40, 39)])
    three = step_time(ONE, cm, [("a", 30, 29), ("a", 40, 39), ("a", 50, 49)])
    assert one == pytest.approx((STEP + 4 * CALL + 2 * CALL) * US)  # 4 block calls + a lone decode per layer
    assert two == pytest.approx((STEP + 4 * CALL + 2 * 77.0) * US) == three


def test_batched_decode_attention_reads_kv_up_to_the_longest_context_of_the_call():
    """The batched decode kernel gathers every sequence's K/V to the longest context: (10, 100) costs what
    (100, 100) costs, more than (55, 55) with the same total context; a lone decode reads its own."""
    from planc.cluster import load_device
    from planc.simulate import step_time

    slow_memory = load_device("H100-80GB").model_copy(update={"mem_bw_gbps": 1e-3, "overheads": Overheads()})
    cm = CostModel(slow_memory, dtype_bytes=4)
    ragged = step_time(ONE, cm, [("a", 11, 10), ("a", 101, 100)])
    assert ragged == pytest.approx(step_time(ONE, cm, [("a", 101, 100), ("a", 101, 100)]))
    even = step_time(ONE, cm, [("a", 56, 55), ("a", 56, 55)])
    # both layers read 2 * 101 cached tokens instead of 2 * 56 (contexts include the new token)
    assert ragged - even == pytest.approx(2 * (202 - 112) * LAYER.kv_bytes_per_token / cm.bandwidth)
    lone = step_time(ONE, cm, [("a", 101, 100)]) - step_time(ONE, cm, [("a", 11, 10)])
    assert lone == pytest.approx(2 * 90 * LAYER.kv_bytes_per_token / cm.bandwidth)


def test_the_toll_of_tokens_streamed_while_the_engine_idles_is_not_charged():
    """A request arriving long after the last one ended pays only its own parsing, not the old tokens'."""
    step = (STEP + 6 * CALL + 4 * SEQ) * US
    cm = served(engine_token_us=TOLL, engine_request_us=REQUEST_TOLL)
    first, late = simulate(ONE, cm, [Request(0.0, "a", 20, 5), Request(1.0, "a", 20, 5)]).requests
    assert late.ttft_s == pytest.approx(first.ttft_s) == pytest.approx((REQUEST + REQUEST_TOLL + TOKEN) * US + step)
