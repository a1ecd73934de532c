"""Shared fixtures: the tiny example (written once per session) and small tokenizers."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(1)
if not torch.cuda.is_available():
    # Triton kernels are tested on the CPU under Triton's interpreter. It is chosen when a kernel is
    # decorated, and peft imports Triton (decorating its standard library) when a test module imports
    # peft, so it must be set here, before any test module is collected.
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """tokenizer.json + tokenizer_config.json + generation_config.json of a small byte-level BPE (259 tokens)."""
    from planc.example.tiny import TinyExample, train_tokenizer, write_tokenizer

    directory = tmp_path_factory.mktemp("tokenizer")
    text = "The quick brown fox jumps over the lazy dog. " * 20 + "Tenants share blocks of weights. " * 20
    write_tokenizer(train_tokenizer([text], 256), directory, TinyExample())
    return directory


@pytest.fixture(scope="session")
def tiny_example(tmp_path_factory) -> Path:
    """The tiny example (base, partial, full, LoRA) written by planc's own generator; returns model.yaml."""
    from planc.example import write_tiny_example

    root = tmp_path_factory.mktemp("tiny")
    write_tiny_example(root)
    return root / "model.yaml"


@pytest.fixture(scope="session")
def tiny_bundle(tiny_example, tmp_path_factory) -> Path:
    import planc

    out = tmp_path_factory.mktemp("bundles") / "tiny"
    planc.emit(planc.compile(planc.load(tiny_example)), out=out)
    return out


def write_yaml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path
