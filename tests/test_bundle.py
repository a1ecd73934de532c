"""The bundle: stored once, verified at load, atomic, deterministic, runnable."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import planc
from planc.errors import BundleError, PassError
from planc.models.checkpoint import Checkpoint


def test_stored_bytes_are_the_unique_parameters(tiny_bundle, tiny_example):
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    t = manifest["totals"]
    # Physical limit: the unique parameters. Within 1% (safetensors headers are the difference).
    assert t["unique_param_bytes"] <= t["stored_bytes"] <= 1.01 * t["unique_param_bytes"]
    root = tiny_example.parent / "models"
    sum_of_variants = sum(Checkpoint.open(root / d, d).nbytes for d in ("base", "legal", "support"))
    sum_of_variants += (root / "chat-lora" / "adapter_model.safetensors").stat().st_size
    assert t["stored_bytes"] < sum_of_variants
    on_disk = sum(f.stat().st_size for d in ("blocks", "adapters") for f in (tiny_bundle / d).iterdir())
    assert on_disk == t["stored_bytes"]


def test_every_unique_block_is_stored_once_and_loaded_once(tiny_bundle):
    bundle = planc.Bundle.open(tiny_bundle)
    files = [b["file"] for b in bundle.manifest["blocks"]]
    assert len(files) == len(set(files)) == len(list((tiny_bundle / "blocks").iterdir()))
    chains = {name: bundle.load_chain(name) for name in bundle.variants}
    assert bundle.num_loaded_blocks == len(bundle.blocks)
    # The shared embedding is one tensor object across base, legal and chat.
    emb = [c.blocks[0].embed_tokens.weight for n, c in chains.items() if n != "support"]
    assert all(e.data_ptr() == emb[0].data_ptr() for e in emb)


def test_manifest_is_byte_identical_for_the_same_inputs(tiny_example, tiny_bundle, tmp_path):
    again = planc.emit(planc.compile(planc.load(tiny_example)), out=tmp_path / "again")
    assert (again / "manifest.json").read_bytes() == (tiny_bundle / "manifest.json").read_bytes()
    assert sorted(os.listdir(again / "blocks")) == sorted(os.listdir(tiny_bundle / "blocks"))


def test_manifest_records_inputs_settings_and_chains(tiny_bundle):
    m = json.loads((tiny_bundle / "manifest.json").read_text())
    assert m["format_version"] == 2 and m["backend"] == "local"
    assert m["settings"]["passes"] == ["trace", "partition", "fingerprint", "dedupe"]
    variants = {v["name"]: v for v in m["variants"]}
    assert {n: v["kind"] for n, v in variants.items()} == {"base": "base", "legal": "partial", "support": "full",
                                                           "chat": "lora"}
    assert variants["legal"]["input"] == {"field": "variants[0].path", "path": "models/legal",
                                          "digest": variants["legal"]["input"]["digest"]}
    assert len(variants["legal"]["input"]["digest"]) == 64
    assert variants["base"]["generation"]["eos_token_ids"] == [1]
    blocks = {b["key"]: b for b in m["blocks"]}
    shared = [blocks[link["block"]] for link in variants["legal"]["chain"][:3]]
    assert all(set(b["users"]) >= {"base", "legal", "chat"} for b in shared)
    assert m["entry_points"] == {"readme": "README.md", "run": "run.py"}


def test_modified_block_is_refused(tiny_bundle, tmp_path):
    import shutil

    copy = tmp_path / "b"
    shutil.copytree(tiny_bundle, copy)
    victim = sorted((copy / "blocks").iterdir())[0]
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=f"{victim.name}: content does not match its recorded sha256"):
        planc.Bundle.open(copy)
    victim.unlink()
    with pytest.raises(BundleError, match="missing from the bundle"):
        planc.Bundle.open(copy)


def test_failed_compile_leaves_nothing(tiny_example, tmp_path):
    class Boom(planc.Pass):
        name = "boom"
        requires = ("zoo",)

        def run(self, program, ctx):
            raise RuntimeError("exploded")

    with pytest.raises(PassError, match="pass 'boom' failed: RuntimeError: exploded"):
        program = planc.compile(planc.load(tiny_example), passes=planc.default_pipeline() + [Boom()])

    class BadBackend:
        name = "bad"

        def emit(self, program, root, ctx):
            (root / "half-written").write_text("x")
            raise OSError("disk full")

    from planc.backends import register_backend
    register_backend(BadBackend())
    program = planc.compile(planc.load(tiny_example))
    with pytest.raises(OSError, match="disk full"):
        planc.emit(program, backend="bad", out=tmp_path / "out")
    assert os.listdir(tmp_path) == []


def test_existing_bundle_is_replaced_whole(tiny_example, tmp_path):
    out = tmp_path / "bundle"
    program = planc.compile(planc.load(tiny_example))
    planc.emit(program, out=out)
    (out / "stale.txt").write_text("old")
    planc.emit(program, out=out)
    assert not (out / "stale.txt").exists() and (out / "manifest.json").is_file()
    assert sorted(os.listdir(tmp_path)) == ["bundle"]


def test_generated_entry_point_runs_one_request(tiny_bundle):
    run = subprocess.run([sys.executable, str(tiny_bundle / "run.py"), "--model", "legal", "--prompt",
                          "The Tenant shall", "--max-tokens", "5"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "legal" in run.stdout and "5 generated" in run.stdout and "The Tenant shall" in run.stdout


def test_inspect_shows_sharing(tiny_bundle):
    run = subprocess.run([sys.executable, "-m", "planc.cli", "inspect", str(tiny_bundle)], capture_output=True,
                         text=True, timeout=120, env={**os.environ, "COLUMNS": "160"})
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    legal = next(l for l in lines if l.startswith("│ legal"))
    assert "partial" in legal and "3/6" in legal
    chat = next(l for l in lines if l.startswith("│ chat"))
    assert "+A" in chat and "6/6" in chat
    assert "dedupe ratio 1.59x" in run.stdout or "dedupe ratio" in run.stdout


def test_greedy_generation_matches_full_model(tiny_bundle, tiny_example):
    """The chain's greedy tokens equal those of planc's whole-model module on the original checkpoint."""
    from planc.generate import generate_ids
    from planc.models.llama import build_model

    ckpt = Checkpoint.open(tiny_example.parent / "models" / "legal", "legal")
    model = build_model(ckpt.arch)
    model.load_state_dict({n: r.read() for n, r in ckpt.tensors.items()})
    bundle = planc.Bundle.open(tiny_bundle)
    prompt = [0, 40, 41, 42]
    with torch.no_grad():
        want, _ = generate_ids(model.eval(), prompt, 8, [])
    got, _ = generate_ids(bundle.load_chain("legal"), prompt, 8, [])
    assert got == want


def test_output_that_is_not_a_bundle_is_never_replaced(tiny_example, tmp_path):
    precious = tmp_path / "checkpoint"
    precious.mkdir()
    (precious / "model.safetensors").write_text("weights")
    program = planc.compile(planc.load(tiny_example))
    with pytest.raises(planc.PlancError, match="exists and is not a planc bundle"):
        planc.emit(program, out=precious)
    assert (precious / "model.safetensors").read_text() == "weights"
    planc.emit(program, out=tmp_path / "empty")  # an empty directory is fine


def test_frozen_tensors_inside_changed_blocks_are_stored_once(tmp_path, tokenizer_dir):
    """Attention-only fine-tunes change every layer block but not its MLP: the MLP is stored once."""
    from planc.example.checkpoints import hf_config, perturb, random_state
    from tests.helpers import write_project

    cfg = hf_config("llama")
    base = random_state(cfg)
    models = {"base": base}
    for i in range(3):
        models[f"attn{i}"] = perturb(base, lambda k: "self_attn.q_proj" in k or "self_attn.v_proj" in k, seed=i + 1)
    program = planc.compile(planc.load(write_project(tmp_path, tokenizer_dir, models)))
    out = planc.emit(program, out=tmp_path / "bundle")
    t = json.loads((out / "manifest.json").read_text())["totals"]
    unique = sum(v.numel() * 4 for v in base.values())  # the base...
    per_variant = sum(v.numel() * 4 for k, v in base.items() if "q_proj" in k or "v_proj" in k)
    unique += 3 * per_variant  # ...plus each variant's q/v projections, nothing else
    assert t["unique_param_bytes"] == unique
    assert unique <= t["stored_bytes"] <= 1.01 * unique
    bundle = planc.Bundle.open(out)
    a = bundle.load_chain("attn0").blocks[1]
    b = bundle.load_chain("attn1").blocks[1]
    assert a is not b and a.mlp.up_proj.weight.data_ptr() == b.mlp.up_proj.weight.data_ptr()
    ids = torch.randint(0, 256, (1, 7))
    from planc.models.llama import build_model
    from planc.models.config import parse_arch
    model = build_model(parse_arch(cfg, "c"))
    model.load_state_dict(models["attn2"])
    assert torch.allclose(bundle.load_chain("attn2")(ids), model.eval()(ids).detach(), atol=1e-6)


def test_manifest_paths_must_stay_inside_the_bundle(tiny_bundle, tmp_path):
    import shutil

    copy = tmp_path / "b"
    shutil.copytree(tiny_bundle, copy)
    m = json.loads((copy / "manifest.json").read_text())
    m["blocks"][0]["file"] = "../../etc/passwd"
    (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="leaves the bundle"):
        planc.Bundle.open(copy)


def test_a_directory_with_someone_elses_manifest_is_not_replaced(tiny_example, tmp_path):
    other = tmp_path / "webext"
    other.mkdir()
    (other / "manifest.json").write_text('{"manifest_version": 3}')
    (other / "background.js").write_text("x")
    with pytest.raises(planc.PlancError, match="not a planc bundle"):
        planc.emit(planc.compile(planc.load(tiny_example)), out=other)
    assert (other / "background.js").exists()
