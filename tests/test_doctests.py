"""The examples in planc's docstrings run and give what they show (those marked +SKIP need files)."""
from __future__ import annotations

import doctest
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    parts = ("planc",) + parts if parts[0] in ("passes", "backends") else parts  # they install inside planc
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = sorted(_module(path) for top in ("planc", "passes", "backends") for path in (ROOT / top).rglob("*.py")
                 if "__pycache__" not in path.parts and ">>> " in path.read_text(encoding="utf-8"))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0, f"{name}: {result.failed} of {result.attempted} examples failed"
