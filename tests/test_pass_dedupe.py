"""Golden test of the dedupe pass on a small instance whose answer is known."""
from __future__ import annotations

from planc.example.checkpoints import hf_config, perturb, random_state, top_layers, write_adapter
from tests.helpers import run_passes, write_project


def test_zoo_and_chains(tmp_path, tokenizer_dir):
    cfg = hf_config("llama")  # 3 layers: chains of 5 blocks
    base = random_state(cfg)
    models = {
        "base": base,
        "top": perturb(base, top_layers(3, 1), seed=1),          # layer.2 + head differ
        "copy": {k: v.clone() for k, v in base.items()},          # bit-identical to the base
        "full": perturb(base, lambda k: True, seed=2),            # everything differs
        "top2": perturb(base, top_layers(3, 1), seed=1),          # same bytes as "top"
    }
    write_adapter(tmp_path / "lora", cfg, targets=("v_proj",), layers=[1])
    program = run_passes(write_project(tmp_path, tokenizer_dir, models, adapters={"lora": "./lora"}), "dedupe")

    assert len(program.zoo) == 5 + 2 + 5
    chains = program.chains
    assert {n: c.kind for n, c in chains.items()} == {"base": "base", "top": "partial", "copy": "identical",
                                                       "full": "full", "top2": "partial", "lora": "lora"}
    assert chains["copy"].block_keys == chains["base"].block_keys
    assert chains["top2"].block_keys == chains["top"].block_keys
    assert chains["top"].block_keys[:3] == chains["base"].block_keys[:3]
    assert chains["top"].block_keys[3:] != chains["base"].block_keys[3:]
    assert not set(chains["full"].block_keys) & set(chains["base"].block_keys)
    assert chains["lora"].block_keys == chains["base"].block_keys
    assert [link.adapter is not None for link in chains["lora"].links] == [False, False, True, False, False]
    assert len(program.adapter_zoo) == 1
    emb = program.zoo[chains["base"].block_keys[0]]
    assert emb.users == ["base", "top", "copy", "top2", "lora"] and emb.source == "base"
    head_top = program.zoo[chains["top"].block_keys[-1]]
    assert head_top.users == ["top", "top2"] and head_top.source == "top"


def test_no_sharing_baseline_keeps_a_copy_per_model(tmp_path, tokenizer_dir):
    import planc
    from planc.passes import DedupePass

    cfg = hf_config("llama")
    base = random_state(cfg)
    yaml = write_project(tmp_path, tokenizer_dir, {"base": base, "copy": {k: v.clone() for k, v in base.items()}})
    passes = [p for p in planc.default_pipeline() if p.name != "dedupe"] + [DedupePass(share_across_models=False)]
    program = planc.compile(planc.load(yaml), passes=passes)
    assert len(program.zoo) == 10
    assert not set(program.chains["base"].block_keys) & set(program.chains["copy"].block_keys)
    assert all(len(b.users) == 1 for b in program.zoo.values())


def test_no_sharing_baseline_also_keeps_its_own_tensors(tmp_path, tokenizer_dir):
    import json

    import planc
    from planc.passes import DedupePass

    cfg = hf_config("llama")
    base = random_state(cfg)
    models = {"base": base, "top": perturb(base, top_layers(3, 1), seed=1)}
    yaml = write_project(tmp_path, tokenizer_dir, models)
    passes = [p for p in planc.default_pipeline() if p.name != "dedupe"] + [DedupePass(share_across_models=False)]
    out = planc.emit(planc.compile(planc.load(yaml), passes=passes), out=tmp_path / "bundle")
    totals = json.loads((out / "manifest.json").read_text())["totals"]
    assert totals["unique_param_bytes"] == 2 * sum(v.numel() * 4 for v in base.values())
