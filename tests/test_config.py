"""config.json normalisation: old and new spellings, defaults, and clear refusals."""
from __future__ import annotations

import json

import pytest
import torch

from planc.errors import CheckpointError
from planc.example.checkpoints import hf_config
from planc.models.config import ArchConfig, generation_ids, parse_arch


def test_old_and_new_rope_spellings_agree():
    old = hf_config("llama", rope_theta=500000.0, rope_scaling={"type": "llama3", "factor": 8.0,
                    "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    new = hf_config("llama", rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                    "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    new.pop("rope_theta")
    assert parse_arch(old, "a") == parse_arch(new, "b")
    assert parse_arch(old, "a").rope.rope_type == "llama3"


def test_defaults_follow_transformers():
    cfg = hf_config("llama")
    for key in ("num_key_value_heads", "tie_word_embeddings", "rope_theta", "rms_norm_eps"):
        cfg.pop(key)
    arch = parse_arch(cfg, "c")
    assert arch.num_kv_heads == arch.num_heads and arch.head_dim == 64 // 4
    assert arch.tie_word_embeddings is False and arch.rope.theta == 10000.0 and arch.rms_norm_eps == 1e-6
    q = parse_arch(hf_config("qwen2"), "q")
    assert q.qkv_bias and not q.o_bias


def test_sliding_window_per_layer():
    assert parse_arch(hf_config("mistral", sliding_window=16), "m").sliding_windows == (16, 16, 16)
    assert parse_arch(hf_config("mistral", sliding_window=None), "m").sliding_windows == (None, None, None)
    q = parse_arch(hf_config("qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=2), "q")
    assert q.sliding_windows == (None, None, 8)
    lt = parse_arch(hf_config("qwen2", sliding_window=8, layer_types=["sliding_attention", "full_attention",
                                                                       "sliding_attention"]), "q")
    assert lt.sliding_windows == (8, None, 8)


@pytest.mark.parametrize("override, message", [
    ({"model_type": "gpt2"}, "model_type 'gpt2' is not supported"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope type 'dynamic' is not supported"),
    ({"rope_scaling": {"rope_type": "longrope"}}, "rope type 'longrope' is not supported"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor 0.5 is not supported"),
    ({"num_key_value_heads": 3}, "not a multiple of num_key_value_heads"),
    ({"hidden_size": None}, "missing field `hidden_size`"),
    ({"num_hidden_layers": 0}, "must be a positive integer"),
    ({"quantization_config": {"quant_method": "gptq"}}, "quantized checkpoints"),
    ({"dtype": "float8_e4m3fn"}, "dtype 'float8_e4m3fn' is not supported"),
])
def test_unsupported_fields_are_refused(override, message):
    with pytest.raises(CheckpointError) as info:
        parse_arch(hf_config("llama", **override), "/m/config.json")
    assert str(info.value).startswith("/m/config.json: ") and message in str(info.value)


def test_eos_ids_from_generation_config_override(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7], "bos_token_id": 1}))
    gen = generation_ids(tmp_path, {"eos_token_id": 2, "pad_token_id": 0})
    assert gen.eos_token_ids == (2, 7) and gen.bos_token_id == 1 and gen.pad_token_id == 0


def test_arch_roundtrips_through_json():
    arch = parse_arch(hf_config("mistral", rope_scaling={"type": "yarn", "factor": 4.0}), "m")
    assert ArchConfig.from_json(json.loads(json.dumps(arch.to_json()))) == arch


def test_yarn_inv_freq_matches_transformers():
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = hf_config("llama", max_position_embeddings=4096,
                    rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024,
                                  "beta_fast": 16})
    hf = transformers.LlamaConfig(**cfg)
    want, want_scale = ROPE_INIT_FUNCTIONS["yarn"](hf, "cpu")
    got, got_scale = parse_arch(cfg, "c").rope.inv_freq(16)
    assert torch.equal(got, want) and got_scale == pytest.approx(want_scale)
