"""The custom pass in examples/ plugs in through model.yaml and through the API, without editing planc."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path
import shutil

import planc

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _load_example_pass():
    spec = importlib.util.spec_from_file_location("custom_pass", EXAMPLES / "custom_pass.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.PrivateBytes


def test_custom_pass_from_model_yaml(tiny_example, tmp_path):
    # The yaml names ../custom_pass.py relative to itself: lay the files out as in the repository.
    root = tiny_example.parent
    shutil.copy(EXAMPLES / "tiny" / "with_custom_pass.yaml", root / "with_custom_pass.yaml")
    shutil.copy(EXAMPLES / "custom_pass.py", root.parent / "custom_pass.py")
    program = planc.compile(planc.load(root / "with_custom_pass.yaml"))
    assert [r.name for r in program.log][-1] == "private_bytes"
    private = program.extras["private_bytes"]
    # support is a full fine-tune: all its bytes are its own; base shares everything with chat/legal except
    # its top layers + head, which only chat (a LoRA on the base) also uses.
    support_bytes = sum(b.nbytes for b in program.zoo.values() if b.users == ["support"])
    assert private["support"]["private_bytes"] == support_bytes
    assert private["base"]["private_bytes"] == 0
    assert private["chat"]["private_bytes"] == sum(d.nbytes for d in program.adapter_zoo.values())
    out = planc.emit(program, out=tmp_path / "bundle")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["annotations"]["private_bytes"] == private
    assert manifest["settings"]["passes"][-1] == "private_bytes"


def test_custom_pass_through_the_api(tiny_example):
    PrivateBytes = _load_example_pass()
    program = planc.compile(planc.load(tiny_example), passes=[PrivateBytes()] + planc.default_pipeline())
    assert [r.name for r in program.log] == ["trace", "partition", "fingerprint", "dedupe", "private_bytes"]
