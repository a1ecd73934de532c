"""Write HF-format checkpoints and PEFT adapters of any supported family, for tests and benchmarks.

Weights are random (seeded) unless given; fine-tunes are made by perturbing chosen tensors of a
base state. Everything is written the way transformers and peft write it (config.json,
model.safetensors or shards + model.safetensors.index.json, adapter_config.json +
adapter_model.safetensors), so transformers can load the same files as the oracle.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable, Optional

import torch
from safetensors.torch import save_file

from planc.models.config import parse_arch
from planc.models.llama import expected_tensors

FAMILY_DEFAULTS = {
    "llama": {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "rope_theta": 10000.0,
              "tie_word_embeddings": False},
    "qwen2": {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "rope_theta": 1000000.0,
              "tie_word_embeddings": True, "use_sliding_window": False},
    "mistral": {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "rope_theta": 10000.0,
                "tie_word_embeddings": False, "sliding_window": 4096},
}


def hf_config(family: str, **overrides) -> dict:
    """A small config.json dict of `family`; `overrides` set any field (e.g. head_dim, rope_scaling)."""
    cfg = {"vocab_size": 320, "hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 3,
           "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_act": "silu",
           "max_position_embeddings": 512, "rms_norm_eps": 1e-6, "bos_token_id": 1, "eos_token_id": 2,
           "dtype": "float32", **FAMILY_DEFAULTS[family]}
    cfg.update(overrides)
    return cfg


def random_state(config: dict, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Random weights for every tensor the config implies (lm_head omitted when tied)."""
    arch = parse_arch(config, "config")
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, (shape, required) in sorted(expected_tensors(arch).items()):
        if not required:
            continue
        if name.endswith("norm.weight"):
            t = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        elif name.endswith(".bias"):
            t = 0.1 * torch.randn(shape, generator=gen)
        else:
            t = torch.randn(shape, generator=gen) * (1.0 / shape[-1] ** 0.5)
        state[name] = t.to(dtype)
    return state


def perturb(state: dict[str, torch.Tensor], select: Callable[[str], bool], seed: int,
            scale: float = 0.05) -> dict[str, torch.Tensor]:
    """A fine-tune of `state`: tensors whose name `select` accepts get seeded noise; the rest are equal."""
    gen = torch.Generator().manual_seed(seed)
    return {k: (v + scale * torch.randn(v.shape, generator=gen).to(v.dtype)) if select(k) else v.clone()
            for k, v in state.items()}


def top_layers(num_layers: int, k: int, head: bool = True) -> Callable[[str], bool]:
    """Selects the top `k` decoder layers (and the final norm + lm_head)."""
    def select(name: str) -> bool:
        m = re.match(r"model\.layers\.(\d+)\.", name)
        if m:
            return int(m.group(1)) >= num_layers - k
        return head and (name.startswith("lm_head") or name == "model.norm.weight")
    return select


def write_checkpoint(directory: Path, config: dict, state: dict[str, torch.Tensor],
                     shard_bytes: Optional[int] = None, tokenizer_from: Optional[Path] = None) -> Path:
    """config.json + model.safetensors, or shards of at most `shard_bytes` with the index file."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tensors = {k: v.contiguous() for k, v in state.items()}
    if shard_bytes is None:
        save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    else:
        shards: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        for name, t in tensors.items():
            nbytes = t.numel() * t.element_size()
            if shards[-1] and size + nbytes > shard_bytes:
                shards.append({})
                size = 0
            shards[-1][name] = t
            size += nbytes
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(directory / fname), metadata={"format": "pt"})
            weight_map.update({name: fname for name in shard})
        (directory / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
             "weight_map": weight_map}, indent=2, sort_keys=True))
    if tokenizer_from is not None:
        from planc.models.tokenizer import TOKENIZER_FILES
        for name in TOKENIZER_FILES:
            if (tokenizer_from / name).is_file():
                (directory / name).write_bytes((tokenizer_from / name).read_bytes())
    return directory


def write_adapter(directory: Path, config: dict, targets: tuple[str, ...] = ("q_proj", "v_proj"),
                  rank: int = 4, alpha: float = 8.0, seed: int = 0, layers: Optional[list[int]] = None,
                  extra_config: Optional[dict] = None) -> Path:
    """A PEFT LoRA adapter with non-zero A and B (as after training) on `targets` of `layers`."""
    arch = parse_arch(config, "config")
    shapes = {n.removesuffix(".weight"): s for n, (s, _) in expected_tensors(arch).items()
              if n.endswith("proj.weight")}
    gen = torch.Generator().manual_seed(seed)
    extra = dict(extra_config or {})
    tensors = {}
    for i in (layers if layers is not None else range(arch.num_layers)):
        for module, (out_dim, in_dim) in shapes.items():
            if not module.startswith(f"model.layers.{i}.") or module.rsplit(".", 1)[-1] not in targets:
                continue
            r = rank
            for key, value in extra.get("rank_pattern", {}).items():
                if re.match(rf"(.*\.)?({key})$", module):
                    r = value
            tensors[f"base_model.model.{module}.lora_A.weight"] = torch.randn(r, in_dim, generator=gen) / in_dim ** 0.5
            tensors[f"base_model.model.{module}.lora_B.weight"] = torch.randn(out_dim, r, generator=gen) * 0.05
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha, "lora_dropout": 0.0,
           "bias": "none", "target_modules": sorted(targets), "fan_in_fan_out": False, "use_rslora": False,
           "use_dora": False, "modules_to_save": None, "base_model_name_or_path": None,
           "inference_mode": True, **extra}
    (directory / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return directory
