"""Bad input to the `planc` CLI: one line on stderr naming the file/field and the problem, a non-zero
exit code, no Python traceback, and no partial bundle left behind.

A few cases run `python -m planc.cli` as a real subprocess (to prove nothing reaches the terminal
but the one line); the rest call `planc.cli.main([...])` in-process, which is what the console
script runs, to keep the file fast.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from planc.example.checkpoints import (hf_config, perturb, random_state, top_layers, write_adapter,
                                       write_checkpoint)

TIMEOUT_S = 180

BASE_CFG = hf_config("llama")  # 3 layers, hidden 64, vocab 320

GOOD_YAML = """\
base: {name: base, path: ./base}
variants:
  - {name: ft, path: ./ft}
  - {name: chat, adapter: ./lora}
backend: local
"""


# --------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="session")
def cli_errors_pristine(tmp_path_factory) -> Path:
    """A valid workspace, written once: base (with tokenizer), a partial fine-tune, a LoRA adapter."""
    from planc.example.tiny import TinyExample, train_tokenizer, write_tokenizer

    root = tmp_path_factory.mktemp("cli_errors") / "ws"
    state = random_state(BASE_CFG, seed=0)
    write_checkpoint(root / "base", BASE_CFG, state)
    text = "Once upon a time the quick brown fox jumped over the lazy dog. " * 10 + "Tenants share weights. " * 10
    write_tokenizer(train_tokenizer([text], 256), root / "base", TinyExample())
    write_checkpoint(root / "ft", BASE_CFG, perturb(state, top_layers(BASE_CFG["num_hidden_layers"], 1), seed=1))
    write_adapter(root / "lora", BASE_CFG, seed=2)
    (root / "model.yaml").write_text(GOOD_YAML)
    return root


@pytest.fixture
def ws(cli_errors_pristine, tmp_path) -> Path:
    """A private, writable copy of the valid workspace."""
    dst = tmp_path / "ws"
    shutil.copytree(cli_errors_pristine, dst)
    return dst


@pytest.fixture(scope="session")
def cli_errors_bundle(cli_errors_pristine, tmp_path_factory) -> Path:
    """The valid workspace compiled once (in-process) into a bundle."""
    from planc.cli import main

    out = tmp_path_factory.mktemp("cli_errors_bundle") / "bundle"
    assert main(["compile", str(cli_errors_pristine / "model.yaml"), "--out", str(out)]) == 0
    assert (out / "manifest.json").is_file()
    return out


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch):
    monkeypatch.delenv("PLANC_DEBUG", raising=False)


# ---------------------------------------------------------------------------------------------- helpers

def run_subprocess(args: list[str], cwd: Path) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PLANC_DEBUG"}
    env["TOKENIZERS_PARALLELISM"] = "false"
    proc = subprocess.run([sys.executable, "-m", "planc.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=TIMEOUT_S)
    return proc.returncode, proc.stdout, proc.stderr


def run_inprocess(args: list[str], capsys) -> tuple[int, str, str]:
    from planc.cli import main

    capsys.readouterr()
    try:
        rc = main(args)
    except SystemExit as exc:  # pragma: no cover - main returns codes, it should not exit
        rc = exc.code if isinstance(exc.code, int) else 1
    except BaseException as exc:  # anything escaping main() would print a traceback from the console script
        captured = capsys.readouterr()
        pytest.fail(f"planc {' '.join(args)} raised {type(exc).__name__}: {exc} (would print a traceback); "
                    f"stderr so far: {captured.err!r}")
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def assert_one_line_error(rc: int, out: str, err: str, *needles: str) -> str:
    """Non-zero exit, exactly one non-empty stderr line containing every needle, no traceback."""
    assert "Traceback" not in out and "Traceback" not in err, f"traceback leaked:\nstdout:\n{out}\nstderr:\n{err}"
    assert rc not in (0, None), f"exit code {rc}; stderr: {err!r}"
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected exactly one stderr line, got {len(lines)}:\n{err}"
    line = lines[0]
    print(line)  # shown by `pytest -rA`
    for needle in needles:
        assert needle in line, f"{needle!r} not in the error line: {line!r}"
    return line


def assert_no_bundle(out_dir: Path) -> None:
    assert not out_dir.exists(), f"a partial bundle was left at {out_dir}"
    leftovers = sorted(p.name for p in out_dir.parent.glob(f".{out_dir.name}.*"))
    assert not leftovers, f"staging leftovers beside {out_dir}: {leftovers}"


def compile_args(ws: Path) -> list[str]:
    return ["compile", str(ws / "model.yaml"), "--out", str(ws / "bundle")]


def write_yaml(ws: Path, text: str) -> Path:
    path = ws / "model.yaml"
    path.write_text(text)
    return path


def truncate_half(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def write_lora_tensors(directory: Path, modules: dict[str, tuple[int, int]], rank: int = 4) -> None:
    """Overwrite adapter_model.safetensors with LoRA A/B pairs for `modules` (name -> (out, in))."""
    gen = torch.Generator().manual_seed(3)
    tensors = {}
    for module, (out_dim, in_dim) in modules.items():
        tensors[f"base_model.model.{module}.lora_A.weight"] = torch.randn(rank, in_dim, generator=gen)
        tensors[f"base_model.model.{module}.lora_B.weight"] = torch.randn(out_dim, rank, generator=gen)
    save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})


# ------------------------------------------------------------------------------------- positive control

def test_valid_workspace_compiles_subprocess(ws):
    rc, out, err = run_subprocess(compile_args(ws), cwd=ws)
    assert rc == 0, f"stdout:\n{out}\nstderr:\n{err}"
    assert "Traceback" not in out + err
    manifest = json.loads((ws / "bundle" / "manifest.json").read_text())
    assert [v["name"] for v in manifest["variants"]] == ["base", "ft", "chat"]
    assert not list(ws.glob(".bundle.*")), "staging dir left behind after a successful compile"


# -------------------------------------------------------------------------------- 1. missing paths

def test_missing_base_path_subprocess(ws):
    write_yaml(ws, GOOD_YAML.replace("./base}", "./no-such-base}"))
    rc, out, err = run_subprocess(compile_args(ws), cwd=ws)
    assert_one_line_error(rc, out, err, "base.path", "no-such-base")
    assert_no_bundle(ws / "bundle")


@pytest.mark.parametrize("old,new,field", [
    ("./ft}", "./no-such-ft}", "variants[0].path"),
    ("./lora}", "./no-such-lora}", "variants[1].adapter"),
])
def test_missing_variant_path(ws, capsys, old, new, field):
    write_yaml(ws, GOOD_YAML.replace(old, new))
    rc, out, err = run_inprocess(compile_args(ws), capsys)
    assert_one_line_error(rc, out, err, field, new.strip("./}"))
    assert_no_bundle(ws / "bundle")


def test_missing_model_yaml(ws, capsys):
    (ws / "model.yaml").unlink()
    rc, out, err = run_inprocess(compile_args(ws), capsys)
    assert_one_line_error(rc, out, err, "model.yaml")
    assert_no_bundle(ws / "bundle")


# ------------------------------------------------------------------------------- 2. YAML syntax error

def test_yaml_syntax_error_names_file_and_line(ws, capsys):
    # Line 4 opens a flow mapping that is never closed; the parser reports it on a later line.
    write_yaml(ws, "base: {name: base, path: ./base}\n"
                   "variants:\n"
                   "  - {name: ft, path: ./ft}\n"
                   "  - {name: chat, adapter: ./lora\n"
                   "backend: local\n")
    rc, out, err = run_inprocess(compile_args(ws), capsys)
    line = assert_one_line_error(rc, out, err, "model.yaml:", "YAML")
    lineno = int(line.split("model.yaml:", 1)[1].split(":", 1)[0])
    assert 4 <= lineno <= 6, line
    assert_no_bundle(ws / "bundle")


def test_yaml_bad_indentation_names_line(ws, capsys):
    write_yaml(ws, "base:\n"
                   "  name: base\n"
                   "  path: ./base\n"
                   "variants:\n"
                   "  - name: ft\n"
                   "    path: ./ft\n"
                   "   adapter: ./lora\n")
    rc, out, err = run_inprocess(compile_args(ws), capsys)
    assert_one_line_error(rc, out, err, "model.yaml:7:", "YAML")
    assert_no_bundle(ws / "bundle")


# --------------------------------------------------------------------------------- 3. unknown keys

@pytest.mark.parametrize("text,location", [
    (GOOD_YAML + "bakend: local\n", "bakend"),
    (GOOD_YAML.replace("{name: ft, path: ./ft}", "{name: ft, path: ./ft, revision: main}"), "variants[0].revision"),
    (GOOD_YAML.replace("{name: base, path: ./base}", "{name: base, path: ./base, dtype: bf16}"), "base.dtype"),
], ids=["top-level", "variant", "base"])
def test_unknown_key(ws, capsys, text, location):
    write_yaml(ws, text)
    rc, out, err = run_inprocess(compile_args(ws), capsys)
    assert_one_line_error(rc, out, err, "model.yaml", location, "unknown key")
    assert_no_bundle(ws / "bundle")


# --------------------------------------------------------------- 4. architecture differs from the base

@pytest.mark.parametrize("override,field_pattern", [
    ({"num_hidden_layers": 4}, ("num_hidden_layers", "num_layers")),
    ({"hidden_size": 128}, ("hidden_size",)),
    ({"intermediate_size": 96}, ("intermediate_size",)),
], ids=["num_hidden_layers", "hidden_size", "intermediate_size"])
def test_variant_architecture_differs(ws, capsys, override, field_pattern):
    cfg = hf_config("llama", **override)
    shutil.rmtree(ws / "ft")
    write_checkpoint(ws / "ft", cfg, random_state(cfg, seed=5))
    rc, out, err = run_inprocess(compile_args(ws), capsys)
    line = assert_one_line_error(rc, out, err, "variants[0].path", "architecture")
    # The config.json key, or planc's name for the same field (num_layers).
    assert any(f in line for f in field_pattern), line
    assert_no_bundle(ws / "bundle")


# --------------------------------------------------------------- 5. tensor shape differs from config

@pytest.mark.parametrize("model_dir,field", [("ft", "variants[0].path"), ("base", "base.path")])
def test_tensor_shape_differs_from_config(ws, capsys, model_dir, field):
    state = random_state(BASE_CFG, seed=7)
    name = "model.layers.1.mlp.up_proj.weight"
    out_dim, in_dim = state[name].shape
    state[name] = torch.zeros(out_dim + 8, in_dim)
    write_checkpoint(ws / model_dir, BASE_CFG, state)
    rc, out, err = run_inprocess(compile_args(ws), capsys)
    assert_one_line_error(rc, out, err, field, name, "shape")
    assert_no_bundle(ws / "bundle")


# ----------------------------------------------------------- 6. adapter targets a module the base lacks

@pytest.mark.parametrize("module,shape", [
    ("model.layers.7.self_attn.q_proj", (64, 64)),       # the base has 3 layers
    ("model.layers.0.self_attn.foo_proj", (64, 64)),     # no such projection
], ids=["layer-7", "foo_proj"])
def test_adapter_targets_missing_module(ws, capsys, module, shape):
    write_lora_tensors(ws / "lora", {"model.layers.0.self_attn.q_proj": (64, 64), module: shape})
    rc, out, err = run_inprocess(compile_args(ws), capsys)
    assert_one_line_error(rc, out, err, "variants[1].adapter", module)
    assert_no_bundle(ws / "bundle")


# ----------------------------------------------------------------------- 7. truncated safetensors

def test_truncated_variant_weights_subprocess(ws):
    truncate_half(ws / "ft" / "model.safetensors")
    rc, out, err = run_subprocess(compile_args(ws), cwd=ws)
    assert_one_line_error(rc, out, err, "variants[0].path", "ft/model.safetensors", "truncated")
    assert_no_bundle(ws / "bundle")


@pytest.mark.parametrize("rel,field", [
    ("base/model.safetensors", "base.path"),
    ("lora/adapter_model.safetensors", "variants[1].adapter"),
])
def test_truncated_safetensors(ws, capsys, rel, field):
    truncate_half(ws / rel)
    rc, out, err = run_inprocess(compile_args(ws), capsys)
    assert_one_line_error(rc, out, err, field, rel, "truncated")
    assert_no_bundle(ws / "bundle")


def test_truncated_to_a_few_bytes(ws, capsys):
    (ws / "ft" / "model.safetensors").write_bytes(b"\x10\x00\x00")
    rc, out, err = run_inprocess(compile_args(ws), capsys)
    assert_one_line_error(rc, out, err, "variants[0].path", "ft/model.safetensors")
    assert_no_bundle(ws / "bundle")


# ------------------------------------------------------------------------- 8. duplicate variant name

def test_duplicate_variant_name(ws, capsys):
    write_yaml(ws, GOOD_YAML.replace("{name: chat, adapter: ./lora}", "{name: ft, adapter: ./lora}"))
    rc, out, err = run_inprocess(compile_args(ws), capsys)
    assert_one_line_error(rc, out, err, "model.yaml", "duplicate", "'ft'")
    assert_no_bundle(ws / "bundle")


def test_variant_named_like_the_base(ws, capsys):
    write_yaml(ws, GOOD_YAML.replace("{name: ft, path: ./ft}", "{name: base, path: ./ft}"))
    rc, out, err = run_inprocess(compile_args(ws), capsys)
    assert_one_line_error(rc, out, err, "model.yaml", "'base'")
    assert_no_bundle(ws / "bundle")


# --------------------------------------------------------------- 9. both / neither of path and adapter

@pytest.mark.parametrize("variant", [
    "{name: ft, path: ./ft, adapter: ./lora}",
    "{name: ft}",
], ids=["both", "neither"])
def test_variant_needs_exactly_one_source(ws, capsys, variant):
    write_yaml(ws, GOOD_YAML.replace("{name: ft, path: ./ft}", variant))
    rc, out, err = run_inprocess(compile_args(ws), capsys)
    assert_one_line_error(rc, out, err, "model.yaml", "variants[0]", "path", "adapter")
    assert_no_bundle(ws / "bundle")


# ------------------------------------------------------------------------- 10. unsupported configs

@pytest.mark.parametrize("model_dir,field,override,needles", [
    ("base", "base.path", {"model_type": "gpt2"}, ("model_type", "'gpt2'")),
    ("ft", "variants[0].path", {"model_type": "gpt2"}, ("model_type", "'gpt2'")),
    ("base", "base.path", {"rope_scaling": {"type": "dynamic", "factor": 2.0}}, ("rope", "'dynamic'")),
    ("ft", "variants[0].path", {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, ("rope", "'dynamic'")),
], ids=["base-gpt2", "variant-gpt2", "base-rope-dynamic", "variant-rope-dynamic"])
def test_unsupported_config(ws, capsys, model_dir, field, override, needles):
    cfg_path = ws / model_dir / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(override)
    cfg_path.write_text(json.dumps(cfg))
    rc, out, err = run_inprocess(compile_args(ws), capsys)
    assert_one_line_error(rc, out, err, field, f"{model_dir}/config.json", "not supported", *needles)
    assert_no_bundle(ws / "bundle")


# -------------------------------------------------------------------- 11. modified file in a bundle

def _corrupt_copy(bundle: Path, tmp_path: Path) -> tuple[Path, Path]:
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    block = sorted((copy / "blocks").glob("*.safetensors"))[0]
    data = bytearray(block.read_bytes())
    data[-1] ^= 0xFF  # a byte of tensor data: the file still parses, only its hash tells
    block.write_bytes(bytes(data))
    return copy, block


def test_modified_block_refused_subprocess(cli_errors_bundle, tmp_path):
    bundle, block = _corrupt_copy(cli_errors_bundle, tmp_path)
    for args in (["inspect", str(bundle)], ["run", str(bundle), "--prompt", "Once upon", "--max-tokens", "2"]):
        rc, out, err = run_subprocess(args, cwd=tmp_path)
        assert_one_line_error(rc, out, err, block.name, "sha256")
        assert "does not match" in err


@pytest.mark.parametrize("subdir", ["adapters", "tokenizers"])
def test_modified_other_bundle_file_refused(cli_errors_bundle, tmp_path, capsys, subdir):
    bundle = tmp_path / "bundle"
    shutil.copytree(cli_errors_bundle, bundle)
    victim = sorted(p for p in (bundle / subdir).rglob("*") if p.is_file())[0]
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0x01
    victim.write_bytes(bytes(data))
    for args in (["inspect", str(bundle)], ["run", str(bundle), "--max-tokens", "1"]):
        rc, out, err = run_inprocess(args, capsys)
        assert_one_line_error(rc, out, err, victim.name, "sha256")


def test_unmodified_bundle_inspects(cli_errors_bundle, capsys):
    rc, out, err = run_inprocess(["inspect", str(cli_errors_bundle)], capsys)
    assert rc == 0, err
    assert "Traceback" not in out + err


# ----------------------------------------------------- 12. a failed compile leaves the old bundle alone

@pytest.mark.parametrize("breakage", ["unknown-key", "truncated-variant", "missing-adapter"])
def test_failed_compile_keeps_existing_bundle(ws, cli_errors_bundle, capsys, breakage):
    bundle = ws / "bundle"
    shutil.copytree(cli_errors_bundle, bundle)
    manifest_before = (bundle / "manifest.json").read_bytes()
    tree_before = tree_digest(bundle)
    if breakage == "unknown-key":
        write_yaml(ws, GOOD_YAML + "extra: 1\n")
    elif breakage == "truncated-variant":
        truncate_half(ws / "ft" / "model.safetensors")
    else:
        shutil.rmtree(ws / "lora")
    rc, out, err = run_inprocess(compile_args(ws), capsys)
    assert_one_line_error(rc, out, err)
    assert (bundle / "manifest.json").read_bytes() == manifest_before
    assert tree_digest(bundle) == tree_before
    leftovers = sorted(p.name for p in ws.glob(".bundle.*"))
    assert not leftovers, f"staging leftovers beside the bundle: {leftovers}"


# ------------------------------------------- more malformed input: must also be one line, no traceback

def _edit_json(path: Path, **fields) -> None:
    data = json.loads(path.read_text())
    data.update(fields)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("field,value", [
    ("rms_norm_eps", "abc"),
    ("max_position_embeddings", "abc"),
    ("num_key_value_heads", "2"),
    ("head_dim", "16"),
    ("eos_token_id", "x"),
    ("num_hidden_layers", "3"),
    ("vocab_size", -1),
])
def test_wrong_typed_config_field(ws, capsys, field, value):
    _edit_json(ws / "ft" / "config.json", **{field: value})
    rc, out, err = run_inprocess(compile_args(ws), capsys)
    assert_one_line_error(rc, out, err, "variants[0].path", "ft/config.json", field)
    assert_no_bundle(ws / "bundle")


def _header_is_a_list(ws: Path) -> None:
    header = b"[1, 2]"
    (ws / "ft" / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)


@pytest.mark.parametrize("setup,needles", [
    pytest.param(lambda ws: (ws / "model.yaml").write_bytes(b"base: {name: base, path: ./b\xff\xfe}\n"),
                 ("model.yaml",), id="model.yaml-not-utf8"),
    pytest.param(_header_is_a_list, ("variants[0].path", "ft/model.safetensors"), id="safetensors-header-not-object"),
    pytest.param(lambda ws: (ws / "lora" / "adapter_config.json").write_text("[]"),
                 ("variants[1].adapter", "adapter_config.json"), id="adapter_config-not-object"),
    pytest.param(lambda ws: _edit_json(ws / "lora" / "adapter_config.json", rank_pattern={"q_proj": "x"}),
                 ("variants[1].adapter", "rank_pattern"), id="adapter-rank_pattern-not-a-number"),
    pytest.param(lambda ws: (ws / "ft" / "config.json").write_text("[1]"), ("variants[0].path", "ft/config.json"),
                 id="config-not-object"),
])
def test_malformed_files(ws, capsys, setup, needles):
    setup(ws)
    rc, out, err = run_inprocess(compile_args(ws), capsys)
    assert_one_line_error(rc, out, err, *needles)
    assert_no_bundle(ws / "bundle")


def test_out_below_a_regular_file(ws, capsys):
    out_dir = ws / "base" / "config.json" / "bundle"
    rc, out, err = run_inprocess(["compile", str(ws / "model.yaml"), "--out", str(out_dir)], capsys)
    assert_one_line_error(rc, out, err, "config.json")


def test_out_over_a_non_bundle_directory_is_refused(ws, capsys):
    before = tree_digest(ws / "ft")
    rc, out, err = run_inprocess(["compile", str(ws / "model.yaml"), "--out", str(ws / "ft")], capsys)
    try:
        assert_one_line_error(rc, out, err, "ft")
        assert tree_digest(ws / "ft") == before
    finally:
        assert not list(ws.glob(".ft.*")), "staging leftovers beside --out"


@pytest.mark.parametrize("edit", [
    pytest.param(lambda m: m.pop("architecture"), id="no-architecture"),
    pytest.param(lambda m: m.pop("variants"), id="no-variants"),
])
def test_edited_manifest_refused(cli_errors_bundle, tmp_path, capsys, edit):
    bundle = tmp_path / "bundle"
    shutil.copytree(cli_errors_bundle, bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    edit(manifest)
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    rc, out, err = run_inprocess(["inspect", str(bundle)], capsys)
    assert_one_line_error(rc, out, err, "manifest.json")


# ----------------------------------------------------- serve --kernels: refused at start, one line

@pytest.mark.parametrize("flag, env, needles", [
    (["--kernels", "bogus"], {}, ["--kernels", "'bogus'", "auto, torch, triton"]),
    (["--kernels", "attention=triton"], {}, ["--kernels", "attention", "no implementation 'triton'"]),
    ([], {"PLANC_KERNELS": "rms_norm=cuda"}, ["PLANC_KERNELS", "rms_norm", "'cuda'"]),
    # "need a CUDA device", or "not installed" where Triton is absent
    (["--kernels", "decode_attention=triton"], {"TRITON_INTERPRET": "0"}, ["kernels:", "Triton"]),
])
def test_serve_bad_kernel_choice(cli_errors_bundle, capsys, monkeypatch, flag, env, needles):
    if torch.cuda.is_available() and env.get("TRITON_INTERPRET") == "0":
        pytest.skip("with a GPU, forcing Triton is allowed")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    rc, out, err = run_inprocess(["serve", str(cli_errors_bundle), "--port", "0", *flag], capsys)
    assert_one_line_error(rc, out, err, *needles)


# ------------------------------------------------------------------------------- command-line usage

@pytest.mark.parametrize("args,message", [
    (["plan", "model.yaml", "--no-such-option"], "No such option: --no-such-option"),
    (["plan", "model.yaml", "extra.json"], "unexpected extra argument"),
    (["serve"], "Missing argument"),
])
def test_usage_errors_get_click_usage_and_exit_2_without_traceback(ws, args, message):
    """typer bundles its own click: its usage errors must still be shown as usage, not raised."""
    rc, out, err = run_subprocess(args, cwd=ws)
    assert rc == 2 and message in err and "Traceback" not in err + out, (rc, out, err)
