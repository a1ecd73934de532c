"""Chains loaded from a bundle give transformers' logits (fp32, max abs 1e-5) for every variant.

Checkpoints are written by planc's generator and, separately, by transformers/peft themselves;
transformers (and peft's merged model for LoRA) is the oracle.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import planc
from planc.example.checkpoints import hf_config, perturb, random_state, top_layers, write_adapter, write_checkpoint

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

TOL = 1e-5

CONFIGS = {
    # Llama: GQA 4:1, untied, llama3 rope scaling in the old spelling, non-default theta and eps.
    "llama-gqa-llama3": hf_config("llama", num_attention_heads=8, num_key_value_heads=2, rope_theta=500000.0,
                                  rms_norm_eps=1e-5, rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                  "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                  "original_max_position_embeddings": 16}),
    # Llama, new spelling (transformers 5 rope_parameters), yarn, explicit head_dim, biases everywhere.
    "llama-yarn-bias": hf_config("llama", head_dim=32, attention_bias=True, mlp_bias=True,
                                 rope_parameters={"rope_type": "yarn", "rope_theta": 20000.0, "factor": 4.0,
                                                  "original_max_position_embeddings": 128},
                                 max_position_embeddings=512),
    # Qwen2: q/k/v bias, tied embeddings, theta 1e6, MHA (no GQA).
    "qwen2-tied-bias": hf_config("qwen2", num_key_value_heads=4, intermediate_size=96),
    # Mistral: sliding window shorter than the test sequence, head_dim != hidden/heads, GQA 8:1.
    "mistral-window": hf_config("mistral", num_attention_heads=8, num_key_value_heads=1, head_dim=24,
                                sliding_window=7, rope_theta=1e6),
    # Llama with linear rope scaling, 1 layer, tied.
    "llama-linear-tied": hf_config("llama", num_hidden_layers=1, tie_word_embeddings=True,
                                   rope_scaling={"type": "linear", "factor": 2.0}),
}


def _hf_logits(model_dir: Path, ids: torch.Tensor, adapter: Path | None = None) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                              attn_implementation="sdpa")
    if adapter is not None:
        model = peft.PeftModel.from_pretrained(model, adapter).merge_and_unload()
    with torch.no_grad():
        return model.eval()(ids).logits


def _compile(root: Path, variants: str) -> planc.Bundle:
    (root / "model.yaml").write_text(f"base: {{name: base, path: ./base}}\nvariants:\n{variants}")
    out = root / "bundle"
    planc.emit(planc.compile(planc.load(root / "model.yaml")), out=out)
    return planc.Bundle.open(out)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_chains_match_transformers(name, tmp_path, tokenizer_dir):
    cfg = CONFIGS[name]
    base = random_state(cfg, seed=1)
    n = cfg["num_hidden_layers"]
    write_checkpoint(tmp_path / "base", cfg, base, tokenizer_from=tokenizer_dir)
    # The partial fine-tune is written sharded, to read through model.safetensors.index.json.
    write_checkpoint(tmp_path / "ft", cfg, perturb(base, top_layers(n, 1), seed=2), shard_bytes=40_000)
    write_checkpoint(tmp_path / "full", cfg, perturb(base, lambda k: True, seed=3))
    write_adapter(tmp_path / "lora", cfg, targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                    "down_proj"), rank=4, alpha=8, seed=4)
    bundle = _compile(tmp_path, "  - {name: ft, path: ./ft}\n  - {name: full, path: ./full}\n"
                                "  - {name: lora, adapter: ./lora}\n")
    ids = torch.randint(0, cfg["vocab_size"], (2, 19), generator=torch.Generator().manual_seed(0))
    expected = {"base": _hf_logits(tmp_path / "base", ids), "ft": _hf_logits(tmp_path / "ft", ids),
                "full": _hf_logits(tmp_path / "full", ids),
                "lora": _hf_logits(tmp_path / "base", ids, adapter=tmp_path / "lora")}
    for variant, want in expected.items():
        got = bundle.load_chain(variant)(ids)
        assert got.shape == want.shape
        err = (got - want).abs().max().item()
        assert err <= TOL, f"{name}/{variant}: max abs logit error {err:.2e}"
    # Sanity of the oracle itself: variants really differ from the base.
    assert (expected["ft"] - expected["base"]).abs().max() > 1e-3
    assert (expected["lora"] - expected["base"]).abs().max() > 1e-3


def test_transformers_and_peft_written_checkpoints(tmp_path, tokenizer_dir):
    """Files written by transformers' save_pretrained (sharded) and peft's save_pretrained load and match."""
    cfg = transformers.LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, rope_theta=30000.0)
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(cfg)
    hf.save_pretrained(tmp_path / "base", max_shard_size="100KB")
    assert (tmp_path / "base" / "model.safetensors.index.json").is_file()
    for f in tokenizer_dir.iterdir():
        (tmp_path / "base" / f.name).write_bytes(f.read_bytes())
    lcfg = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], use_rslora=True,
                           rank_pattern={"down_proj": 4}, alpha_pattern={"v_proj": 4}, lora_dropout=0.0)
    pm = peft.get_peft_model(hf, lcfg)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)  # a trained adapter: B is no longer zero
    pm.save_pretrained(tmp_path / "lora")
    pm.eval()
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want_lora = pm.merge_and_unload()(ids).logits
    bundle = _compile(tmp_path, "  - {name: lora, adapter: ./lora}\n")
    assert (bundle.load_chain("base")(ids) - _hf_logits(tmp_path / "base", ids)).abs().max() <= TOL
    assert (bundle.load_chain("lora")(ids) - want_lora).abs().max() <= TOL


def test_bfloat16_checkpoint_keeps_its_dtype(tmp_path, tokenizer_dir):
    cfg = hf_config("llama", dtype="bfloat16")
    write_checkpoint(tmp_path / "base", cfg, random_state(cfg, seed=5, dtype=torch.bfloat16),
                     tokenizer_from=tokenizer_dir)
    bundle = _compile(tmp_path, "  []\n")
    manifest = json.loads((tmp_path / "bundle" / "manifest.json").read_text())
    assert manifest["totals"]["unique_param_bytes"] == sum(
        p.numel() * 2 for p in random_state(cfg, seed=5).values())
    ids = torch.randint(0, 256, (1, 9))
    got = bundle.load_chain("base")(ids)
    assert got.dtype == torch.bfloat16
    want = _hf_logits(tmp_path / "base", ids).to(torch.bfloat16)
    assert (got.float() - want.float()).abs().max() < 0.1


def _two_model_bundle(tmp_path, tokenizer_dir, base_cfg, base_state, var_cfg, var_state):
    write_checkpoint(tmp_path / "base", base_cfg, base_state, tokenizer_from=tokenizer_dir)
    write_checkpoint(tmp_path / "var", var_cfg, var_state)
    return _compile(tmp_path, "  - {name: var, path: ./var}\n")


def test_tied_config_with_a_trained_separate_head_is_untied_as_transformers_does(tmp_path, tokenizer_dir):
    """A Qwen2 fine-tune that trained only lm_head but kept `tie_word_embeddings: true` in its config."""
    cfg = hf_config("qwen2")
    base = random_state(cfg, seed=1)
    var = {k: v.clone() for k, v in base.items()}
    var["lm_head.weight"] = base["model.embed_tokens.weight"] + 0.1 * torch.randn_like(base["model.embed_tokens.weight"])
    bundle = _two_model_bundle(tmp_path, tokenizer_dir, cfg, base, cfg, var)
    assert bundle.variant("var")["kind"] == "partial"  # the head differs; everything else is shared
    ids = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(2))
    for name in ("base", "var"):
        want = _hf_logits(tmp_path / name, ids)
        assert (bundle.load_chain(name)(ids) - want).abs().max() <= TOL


def test_tied_checkpoint_that_stores_only_the_head(tmp_path, tokenizer_dir):
    cfg = hf_config("qwen2")
    state = random_state(cfg, seed=3)
    state["lm_head.weight"] = state.pop("model.embed_tokens.weight")
    write_checkpoint(tmp_path / "base", cfg, state, tokenizer_from=tokenizer_dir)
    bundle = _compile(tmp_path, "  []\n")
    ids = torch.randint(0, 256, (1, 8))
    assert (bundle.load_chain("base")(ids) - _hf_logits(tmp_path / "base", ids)).abs().max() <= TOL


def test_config_defaults_follow_transformers(tmp_path, tokenizer_dir):
    """Qwen2's max_window_layers defaults to 28; a Mistral config without sliding_window means 4096."""
    cfg = hf_config("qwen2", num_hidden_layers=30, hidden_size=32, intermediate_size=48, use_sliding_window=True,
                    sliding_window=4)
    state = random_state(cfg, seed=4)
    write_checkpoint(tmp_path / "base", cfg, state, tokenizer_from=tokenizer_dir)
    bundle = _compile(tmp_path, "  []\n")
    ids = torch.randint(0, 256, (1, 12))
    assert (bundle.load_chain("base")(ids) - _hf_logits(tmp_path / "base", ids)).abs().max() <= TOL
    mistral = hf_config("mistral")
    mistral.pop("sliding_window")
    from planc.models.config import parse_arch
    assert set(parse_arch(mistral, "c").sliding_windows) == {4096}


def test_a_longer_context_fine_tune_still_shares_blocks(tmp_path, tokenizer_dir):
    cfg = hf_config("llama")
    base = random_state(cfg, seed=5)
    long_cfg = {**cfg, "max_position_embeddings": 8192}
    bundle = _two_model_bundle(tmp_path, tokenizer_dir, cfg, base, long_cfg, perturb(base, top_layers(3, 1), 6))
    assert bundle.variant("var")["kind"] == "partial"
