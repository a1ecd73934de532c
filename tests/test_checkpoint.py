"""Lazy safetensors reading and PEFT adapter parsing."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from planc.errors import CheckpointError
from planc.example.checkpoints import hf_config, random_state, write_adapter, write_checkpoint
from planc.models.checkpoint import Checkpoint
from planc.models.lora import Adapter
from planc.models.safetensors_index import read_checkpoint_tensors, read_header


def test_lazy_reads_match_safetensors(tmp_path):
    tensors = {"a": torch.randn(3, 4), "b": torch.arange(6, dtype=torch.int64), "c": torch.randn(5).bfloat16()}
    save_file(tensors, str(tmp_path / "x.safetensors"))
    refs = read_header(tmp_path / "x.safetensors")
    for name, t in tensors.items():
        assert torch.equal(refs[name].read(), t)
        assert b"".join(refs[name].chunks()) == t.contiguous().view(torch.uint8).numpy().tobytes()


def test_truncated_file_is_refused(tmp_path):
    save_file({"a": torch.randn(100, 100)}, str(tmp_path / "x.safetensors"))
    data = (tmp_path / "x.safetensors").read_bytes()
    (tmp_path / "x.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated: tensor 'a' needs"):
        read_header(tmp_path / "x.safetensors")
    (tmp_path / "x.safetensors").write_bytes(data[:5])
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        read_header(tmp_path / "x.safetensors")


def test_sharded_index_must_agree_with_shards(tmp_path):
    cfg = hf_config("llama")
    write_checkpoint(tmp_path, cfg, random_state(cfg), shard_bytes=50_000)
    tensors, files = read_checkpoint_tensors(tmp_path)
    assert len(files) > 2 and len(tensors) == len(random_state(cfg))
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    name = next(iter(index["weight_map"]))
    index["weight_map"][name] = files[-1].name if index["weight_map"][name] != files[-1].name else files[0].name
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"tensor '{name}' is not in shard"):
        read_checkpoint_tensors(tmp_path)


def test_pickle_only_checkpoint_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(hf_config("llama")))
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="base.path: .*only pickle checkpoints"):
        Checkpoint.open(tmp_path, "base.path")


def test_missing_and_unexpected_tensors(tmp_path):
    cfg = hf_config("llama")
    state = random_state(cfg)
    state.pop("model.layers.1.mlp.up_proj.weight")
    write_checkpoint(tmp_path / "a", cfg, state)
    with pytest.raises(CheckpointError, match="missing tensors model.layers.1.mlp.up_proj.weight"):
        Checkpoint.open(tmp_path / "a", "f")
    state = random_state(cfg)
    state["model.layers.0.self_attn.q_norm.weight"] = torch.ones(16)
    write_checkpoint(tmp_path / "b", cfg, state)
    with pytest.raises(CheckpointError, match="unexpected tensor 'model.layers.0.self_attn.q_norm.weight'"):
        Checkpoint.open(tmp_path / "b", "f")


def test_tied_checkpoint_with_a_saved_lm_head_copy(tmp_path):
    cfg = hf_config("qwen2")
    state = random_state(cfg)
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    write_checkpoint(tmp_path, cfg, state)
    assert "lm_head.weight" not in Checkpoint.open(tmp_path, "f").tensors


def _base_shapes(cfg):
    ckpt_cfg = random_state(cfg)
    return {k.removesuffix(".weight"): tuple(v.shape) for k, v in ckpt_cfg.items() if k.endswith("proj.weight")}


def test_adapter_scaling_patterns_and_rslora(tmp_path):
    cfg = hf_config("llama")
    write_adapter(tmp_path, cfg, targets=("q_proj", "down_proj"), rank=8, alpha=16,
                  extra_config={"rank_pattern": {"down_proj": 2}, "alpha_pattern": {"q_proj": 4},
                                "use_rslora": True})
    adapter = Adapter.open(tmp_path, "variants[0].adapter", _base_shapes(cfg))
    q = adapter.modules["model.layers.0.self_attn.q_proj"]
    down = adapter.modules["model.layers.2.mlp.down_proj"]
    assert (q.rank, q.scaling) == (8, pytest.approx(4 / 8 ** 0.5))
    assert (down.rank, down.scaling) == (2, pytest.approx(16 / 2 ** 0.5))


@pytest.mark.parametrize("extra, message", [
    ({"use_dora": True}, "use_dora is not supported"),
    ({"bias": "all"}, "bias 'all' is not supported"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"peft_type": "IA3"}, "peft_type 'IA3' is not supported"),
])
def test_unsupported_adapters_are_refused(tmp_path, extra, message):
    cfg = hf_config("llama")
    write_adapter(tmp_path, cfg, extra_config=extra)
    with pytest.raises(CheckpointError, match=message):
        Adapter.open(tmp_path, "variants[0].adapter", _base_shapes(cfg))


def test_adapter_for_a_module_the_base_lacks(tmp_path):
    big = hf_config("llama", num_hidden_layers=5)
    write_adapter(tmp_path, big, layers=[4])
    with pytest.raises(CheckpointError, match="variants\\[0\\].adapter: .*adapts model.layers.4.self_attn.q_proj, "
                                              "which the base model does not have"):
        Adapter.open(tmp_path, "variants[0].adapter", _base_shapes(hf_config("llama")))


def test_mixed_dtypes_and_bad_patterns_are_refused(tmp_path):
    cfg = hf_config("llama", dtype="bfloat16")
    state = random_state(cfg, dtype=torch.bfloat16)
    state["model.norm.weight"] = state["model.norm.weight"].float()
    write_checkpoint(tmp_path / "mixed", cfg, state)
    with pytest.raises(CheckpointError, match="mixed dtypes"):
        Checkpoint.open(tmp_path / "mixed", "f")
    write_adapter(tmp_path / "re", hf_config("llama"))
    cfg_path = tmp_path / "re" / "adapter_config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "rank_pattern": {"[": 4}}))
    with pytest.raises(CheckpointError, match="rank_pattern: pattern '\\[' is not a valid regular expression"):
        Adapter.open(tmp_path / "re", "variants[0].adapter", _base_shapes(hf_config("llama")))
