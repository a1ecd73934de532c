"""Small builders shared by the pass tests."""
from __future__ import annotations

from pathlib import Path

import torch

import planc
from planc.example.checkpoints import hf_config, random_state, write_checkpoint
from planc.models.config import parse_arch
from planc.models.llama import build_model


def arch_of(family: str = "llama", **overrides):
    return parse_arch(hf_config(family, **overrides), "config.json")


def real_model(family: str = "llama", seed: int = 0, **overrides):
    """A CPU model with random weights for `family`, and its state dict."""
    cfg = hf_config(family, **overrides)
    state = random_state(cfg, seed=seed)
    model = build_model(parse_arch(cfg, "config.json"))
    model.load_state_dict(state, strict=False)
    if model.config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval(), state


def write_project(root: Path, tokenizer_dir: Path, models: dict[str, dict], adapters: dict[str, Path] = {},
                  config: dict | None = None) -> Path:
    """Write checkpoints {name: state} (first is the base) and a model.yaml naming them."""
    cfg = config or hf_config("llama")
    names = list(models)
    for i, (name, state) in enumerate(models.items()):
        write_checkpoint(root / name, cfg, state, tokenizer_from=tokenizer_dir if i == 0 else None)
    lines = [f"base: {{name: {names[0]}, path: ./{names[0]}}}", "variants:"]
    lines += [f"  - {{name: {n}, path: ./{n}}}" for n in names[1:]]
    lines += [f"  - {{name: {n}, adapter: {p}}}" for n, p in adapters.items()]
    if len(lines) == 2:
        lines[-1] = "variants: []"
    (root / "model.yaml").write_text("\n".join(lines) + "\n")
    return root / "model.yaml"


def run_passes(yaml: Path, upto: str) -> planc.Program:
    passes = []
    for p in planc.default_pipeline():
        passes.append(p)
        if p.name == upto:
            break
    return planc.compile(planc.load(yaml), passes=passes)


def ids(vocab: int = 256, shape=(2, 11), seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))
