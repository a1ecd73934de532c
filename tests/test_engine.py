"""The engine's greedy tokens equal transformers' `generate` for every variant, while requests of all
variants are batched together per block, and through preemption when the KV cache is small."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import planc
from planc.example.checkpoints import hf_config, perturb, random_state, top_layers, write_adapter, write_checkpoint
from planc.runtime.engine import Engine, EngineConfig, StepStats
from planc.runtime.sampling import SamplingParams

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

FAMILIES = {
    "llama": hf_config("llama", num_attention_heads=8, num_key_value_heads=2, rope_theta=50000.0),
    "qwen2": hf_config("qwen2"),
    "mistral": hf_config("mistral", sliding_window=6, head_dim=24),
}
PROMPTS = [[1, 17, 33, 9], [1, 200, 5], [1, 8, 8, 8, 8, 8, 8, 8, 40], [1, 99], [1, 3, 4, 5, 6, 7]]
NEW_TOKENS = 12


def _hf_generate(model_dir: Path, prompt: list[int], adapter: Path | None = None) -> list[int]:
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter is not None:
        model = peft.PeftModel.from_pretrained(model, adapter).merge_and_unload()
    # eos/pad come from the checkpoint's generation_config.json, as planc reads them.
    out = model.eval().generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False)
    tokens = out[0, len(prompt):].tolist()
    eos = model.generation_config.eos_token_id
    eos = set(eos) if isinstance(eos, list) else {eos}
    return tokens[:-1] if tokens and tokens[-1] in eos else tokens


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_bundle(request, tmp_path_factory, tokenizer_dir):
    cfg = FAMILIES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    base = random_state(cfg, seed=11)
    write_checkpoint(root / "base", cfg, base, tokenizer_from=tokenizer_dir)
    write_checkpoint(root / "ft", cfg, perturb(base, top_layers(3, 1), seed=12, scale=0.3))
    write_adapter(root / "lora", cfg, targets=("q_proj", "v_proj", "down_proj"), rank=4, alpha=16, seed=13)
    (root / "model.yaml").write_text("base: {path: ./base}\nvariants:\n  - {name: ft, path: ./ft}\n"
                                     "  - {name: lora, adapter: ./lora}\n")
    bundle = planc.emit(planc.compile(planc.load(root / "model.yaml")), out=root / "bundle")
    sources = {"base": (root / "base", None), "ft": (root / "ft", None), "lora": (root / "base", root / "lora")}
    return planc.Bundle.open(bundle), sources


def _run_all(engine: Engine, requests: list[tuple[str, list[int]]], params: SamplingParams) -> list[list[int]]:
    outputs: list[list[int]] = [[] for _ in requests]
    finished = []
    for i, (variant, prompt) in enumerate(requests):
        def sink(event, i=i):
            if event.token_id is not None:
                outputs[i].append(event.token_id)
            if event.finished:
                finished.append((i, event.finish_reason))
        engine.submit(variant, prompt, params, sink)
    steps = 0
    while engine.has_work():
        engine.step()
        steps += 1
        assert steps < 10_000
    assert sorted(i for i, _ in finished) == list(range(len(requests)))
    return outputs


def test_greedy_matches_transformers_with_mixed_batches(family_bundle):
    bundle, sources = family_bundle
    batches = []
    engine = Engine(bundle, EngineConfig(), StepStats(on_batch=lambda key, size, nv: batches.append((key, size, nv))))
    requests = [(v, p) for p in PROMPTS for v in ("base", "ft", "lora")]
    got = _run_all(engine, requests, SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0))
    for (variant, prompt), tokens in zip(requests, got):
        directory, adapter = sources[variant]
        assert tokens == _hf_generate(directory, prompt, adapter), (variant, prompt)
    # The embedding and the lower layers are shared by all three variants: their batches mix variants.
    shared = bundle.variant("base")["chain"][0]["block"]
    assert max(nv for key, size, nv in batches if key == shared) == 3
    top = bundle.variant("ft")["chain"][-1]["block"]
    assert max(nv for key, size, nv in batches if key == top) == 1


def test_preemption_keeps_outputs_exact(family_bundle):
    bundle, _ = family_bundle
    requests = [(v, p) for p in PROMPTS for v in ("base", "ft", "lora")]
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0)
    roomy = _run_all(Engine(bundle, EngineConfig()), requests, params)
    arch = bundle.arch
    page_bytes = 2 * 4 * arch.num_kv_heads * arch.head_dim * 4
    tight = Engine(bundle, EngineConfig(kv_cache_bytes=page_bytes * arch.num_layers * 12, page_size=4))
    assert _run_all(tight, requests, params) == roomy
    assert tight.stats.preemptions > 0
    assert tight.kv_free_pages() == tight.kv_pages()  # every page came back


def test_chunked_prefill_keeps_outputs_exact_and_steps_within_budget(family_bundle):
    """A 5-token budget splits every prompt over several steps (mistral's sliding window of 6 is crossed
    by chunks too); the tokens stay transformers', and no step runs more tokens than the budget."""
    bundle, sources = family_bundle
    tokens_per_step = []

    class Counting(Engine):
        def _schedule(self, work):
            out = super()._schedule(work)
            tokens_per_step.append(sum(s.scheduled for s in out))
            return out

    requests = [(v, p) for p in PROMPTS for v in ("base", "ft", "lora")]
    got = _run_all(Counting(bundle, EngineConfig(max_batch_tokens=5)), requests,
                   SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0))
    for (variant, prompt), tokens in zip(requests, got):
        directory, adapter = sources[variant]
        assert tokens == _hf_generate(directory, prompt, adapter), (variant, prompt)
    assert max(tokens_per_step) == 5  # so the 9- and 6-token prompts were prefilled in chunks


def test_seeded_sampling_is_reproducible_whatever_the_batch(family_bundle):
    bundle, _ = family_bundle
    params = SamplingParams(max_tokens=10, temperature=0.9, top_p=0.9, top_k=50, seed=1234)
    alone = _run_all(Engine(bundle), [("lora", PROMPTS[0])], params)[0]
    crowd = _run_all(Engine(bundle), [("base", PROMPTS[1]), ("lora", PROMPTS[0]), ("ft", PROMPTS[2])], params)[1]
    assert alone == crowd
    other = _run_all(Engine(bundle), [("lora", PROMPTS[0])],
                     SamplingParams(max_tokens=10, temperature=0.9, top_p=0.9, top_k=50, seed=99))[0]
    assert other != alone


def test_abort_frees_kv(family_bundle):
    bundle, _ = family_bundle
    engine = Engine(bundle)
    events = []
    seq = engine.submit("base", PROMPTS[0], SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True),
                        events.append)
    engine.step()
    engine.step()
    assert engine.kv_free_pages() < engine.kv_pages()
    engine.abort(seq)
    engine.step()
    assert engine.kv_free_pages() == engine.kv_pages() and not engine.running
    assert events[-1].finished and events[-1].finish_reason == "abort"


def test_several_stages_give_the_same_tokens(family_bundle):
    """Stages are the unit of placement: splitting the chain over three of them changes nothing.
    (For qwen2 the tied head sits in another stage than the embedding it ties to.)"""
    from planc.runtime.stage import local_stages

    bundle, _ = family_bundle
    requests = [(v, p) for p in PROMPTS[:3] for v in ("base", "ft", "lora")]
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0)
    one = _run_all(Engine(bundle), requests, params)
    config = EngineConfig(kv_cache_bytes=2**20, page_size=4)
    stages = local_stages(bundle, config.kv_cache_bytes, config.page_size, num_stages=3)
    assert [list(s.positions) for s in stages] == [[0, 1], [2], [3, 4]]
    engine = Engine(bundle, config, stages=stages)
    assert _run_all(engine, requests, params) == one
    assert [s.layers for s in stages] == [[0], [1], [2]]  # each stage holds the KV of its own layers only


def test_a_failing_step_fails_its_sequences_not_the_engine(family_bundle):
    import threading

    bundle, _ = family_bundle
    engine = Engine(bundle)
    events = []
    original = engine.stages[0].run
    calls = {"n": 0}

    def flaky(*args):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("boom")
        return original(*args)

    engine.stages[0].run = flaky
    with engine.in_thread():
        engine.submit("base", PROMPTS[0], SamplingParams(max_tokens=3, temperature=0.0), events.append)
        for _ in range(200):
            if events and events[-1].finished:
                break
            threading.Event().wait(0.05)
        assert events[-1].finish_reason == "error" and "boom" in events[-1].error
        done = []
        engine.submit("base", PROMPTS[1], SamplingParams(max_tokens=3, temperature=0.0), done.append)
        for _ in range(200):
            if done and done[-1].finished:
                break
            threading.Event().wait(0.05)
    assert done[-1].finish_reason == "length" and len(done) == 4  # the engine kept serving after the failure
