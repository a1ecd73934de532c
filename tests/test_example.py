"""The tiny example is real: trained, in HF/PEFT formats, with the sharing the yaml claims."""
from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from planc.example.tiny import MODEL_YAML


def test_files_and_formats(tiny_example):
    root = tiny_example.parent
    assert tiny_example.read_text() == MODEL_YAML
    for d in ("base", "legal", "support"):
        assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in (root / "models" / d).iterdir()}
    cfg = json.loads((root / "models" / "base" / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["num_key_value_heads"] < cfg["num_attention_heads"]
    adapter = json.loads((root / "models" / "chat-lora" / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "LORA" and adapter["r"] == 8
    size = sum(p.stat().st_size for p in (root / "models" / "base").iterdir())
    assert 1_000_000 < size < 10_000_000


def test_fine_tunes_change_what_they_claim(tiny_example):
    models = tiny_example.parent / "models"
    base = load_file(models / "base" / "model.safetensors")
    legal = load_file(models / "legal" / "model.safetensors")
    support = load_file(models / "support" / "model.safetensors")
    changed = {k for k in base if not torch.equal(base[k], legal[k])}
    assert changed and all(k.startswith(("model.layers.2.", "model.layers.3.", "model.norm", "lm_head"))
                           for k in changed)
    assert "lm_head.weight" in changed and any(k.startswith("model.layers.3.") for k in changed)
    assert all(not torch.equal(base[k], support[k]) for k in base)
    lora = load_file(models / "chat-lora" / "adapter_model.safetensors")
    b_weights = [v for k, v in lora.items() if "lora_B" in k]
    assert b_weights and all(v.abs().max() > 0 for v in b_weights)  # trained: the delta is not zero


def test_base_training_lowered_the_loss(tmp_path):
    from planc.example.tiny import TinyExample, write_tiny_example

    cfg = write_tiny_example(tmp_path, TinyExample(base_steps=12, finetune_steps=4))
    for name, losses in cfg.losses.items():
        assert losses[-1] < losses[0], name
