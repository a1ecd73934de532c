"""Tokenizer files of a checkpoint, loaded with the `tokenizers` library (never transformers)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from planc.errors import CheckpointError
from planc.jsonfile import read_json_object

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "chat_template.jinja")


def tokenizer_files(directory: Path, field: str) -> list[Path]:
    """The tokenizer files a bundle copies; tokenizer.json is required."""
    if not (directory / "tokenizer.json").is_file():
        if (directory / "tokenizer.model").is_file():
            raise CheckpointError(f"{field}: {directory} has only a sentencepiece tokenizer.model; planc needs "
                                  "tokenizer.json (save the tokenizer with a fast tokenizer)")
        raise CheckpointError(f"{field}: {directory} has no tokenizer.json")
    return [directory / n for n in TOKENIZER_FILES if (directory / n).is_file()]


def load_tokenizer(directory: Path):
    """A `tokenizers.Tokenizer` from tokenizer.json."""
    from tokenizers import Tokenizer

    path = directory / "tokenizer.json"
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception on malformed files
        raise CheckpointError(f"{path}: cannot load tokenizer: {exc}") from None


def tokenizer_config(directory: Path) -> dict[str, Any]:
    path = directory / "tokenizer_config.json"
    return read_json_object(path) if path.is_file() else {}


def chat_template(directory: Path) -> Optional[str]:
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    return tokenizer_config(directory).get("chat_template")
