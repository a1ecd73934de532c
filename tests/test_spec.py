"""model.yaml validation: relative paths, and errors that name the file and the field."""
from __future__ import annotations

from pathlib import Path

import pytest

from planc.errors import SpecError
from planc.spec import field_of, load_spec


def _yaml(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "model.yaml"
    p.write_text(text)
    return p


def test_relative_paths_resolve_against_the_yaml_file(tmp_path):
    sub = tmp_path / "conf"
    sub.mkdir()
    spec = load_spec(_yaml(sub, "base: {name: b, path: ../models/b}\nvariants:\n"
                                "  - {name: x, path: /abs/x}\n  - {name: y, adapter: ./y}\n"))
    assert spec.base.path == sub / "../models/b"
    assert spec.variants[0].path == Path("/abs/x")
    assert spec.variants[1].adapter == sub / "y"
    assert spec.model_names() == ["b", "x", "y"]
    assert field_of(spec, "y") == "variants[1].adapter" and field_of(spec, "b") == "base.path"
    assert spec.backend == "local" and spec.passes == []


@pytest.mark.parametrize("text, message", [
    ("base: {path: ./m}\nvariants:\n  - {name: a, path: ./a}\n  - {name: a, adapter: ./b}\n",
     "variants: duplicate variant name 'a'"),
    ("base: {path: ./m}\nvariants:\n  - {name: base, path: ./a}\n", "already the base's name"),
    ("base: {path: ./m}\nvariants:\n  - {name: a, path: ./a, adapter: ./b}\n",
     "variants[0]: give one of `path`"),
    ("base: {path: ./m}\nvariants:\n  - {name: a}\n", "variants[0]: give `path`"),
    ("base: {path: ./m}\nvariants:\n  - {name: a, adapter: ./a, changes: [head]}\n", "variants[0]: `changes` describes"),
    ("base: {path: ./m}\nplan: {objective: fastest}\n", "plan.objective"),
    ("base: {path: ./m}\nplan: {slo: {tpot_ms: 0}}\n", "plan.slo.tpot_ms"),
    ("base: {path: ./m}\nvariant: []\n", "variant: unknown key"),
    ("base: {path: ./m, dtype: fp16}\n", "base.dtype: unknown key"),
    ("variants: []\n", "base: Field required"),
    ("base: {path: ./m}\nvariants:\n  - {name: 'bad name!', path: ./a}\n", "variants[0].name: String should match"),
    ("- just\n- a list\n", "expected a mapping"),
])
def test_invalid_specs_name_the_field(tmp_path, text, message):
    path = _yaml(tmp_path, text)
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert str(info.value).startswith(str(path))
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_yaml_syntax_error_names_line_and_column(tmp_path):
    path = _yaml(tmp_path, "base: {path: ./m}\nvariants:\n  - {name: a, path: ./a\n")
    with pytest.raises(SpecError, match=r"model\.yaml:\d+:\d+: YAML syntax error"):
        load_spec(path)


def test_missing_file(tmp_path):
    with pytest.raises(SpecError, match="no such file"):
        load_spec(tmp_path / "nope.yaml")


def test_duplicate_keys_are_refused(tmp_path):
    path = _yaml(tmp_path, "base: {path: ./a}\nbase: {path: ./b}\n")
    with pytest.raises(SpecError, match=r"model\.yaml:2:1: YAML syntax error: duplicate key 'base'"):
        load_spec(path)
