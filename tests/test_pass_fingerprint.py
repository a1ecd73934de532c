"""Golden tests of the fingerprint pass: what changes a structure hash, what changes a weight hash."""
from __future__ import annotations

import hashlib


from planc.example.checkpoints import hf_config, perturb, random_state, write_adapter, write_checkpoint
from planc.passes.fingerprint import structure_hash
from planc.passes.partition import HFBlockPolicy, partition_graph
from planc.passes.trace import trace_architecture
from tests.helpers import arch_of, run_passes, write_project


def _structures(**overrides) -> list[str]:
    specs = partition_graph(trace_architecture(arch_of(**overrides)), HFBlockPolicy())
    return [structure_hash(s) for s in specs]


def test_decoder_layers_share_a_structure_hash_embedding_and_head_differ():
    emb, *layers, head = _structures()
    assert len(set(layers)) == 1
    assert len({emb, layers[0], head}) == 3


def test_every_field_that_changes_the_math_changes_the_structure_hash():
    base = _structures()
    for change in ({"rope_theta": 20000.0}, {"rms_norm_eps": 1e-5}, {"attention_bias": True},
                   {"rope_scaling": {"type": "linear", "factor": 2.0}}, {"tie_word_embeddings": True}):
        assert _structures(**change)[1:] != base[1:], change
    # Mistral's sliding window changes layers, not the embedding.
    a = partition_graph(trace_architecture(arch_of("mistral", sliding_window=8)), HFBlockPolicy())
    b = partition_graph(trace_architecture(arch_of("mistral", sliding_window=16)), HFBlockPolicy())
    assert structure_hash(a[1]) != structure_hash(b[1])
    assert structure_hash(a[0]) == structure_hash(b[0])


def test_weight_hash_follows_the_documented_formula(tmp_path, tokenizer_dir):
    state = random_state(hf_config("llama"))
    program = run_passes(write_project(tmp_path, tokenizer_dir, {"base": state}), "fingerprint")
    emb = program.fingerprints["base"][0]
    t = state["model.embed_tokens.weight"]
    digest = hashlib.sha256(t.numpy().tobytes()).hexdigest()
    expected = hashlib.sha256(f"embed_tokens.weight|F32|{list(t.shape)}|{digest}\n".encode()).hexdigest()
    assert emb.weight_hash == expected
    assert emb.nbytes == t.numel() * 4 and emb.num_params == t.numel()


def test_weight_hash_ignores_file_layout_and_sees_one_changed_value(tmp_path, tokenizer_dir):
    cfg = hf_config("llama")
    state = random_state(cfg)
    write_checkpoint(tmp_path / "base", cfg, state, tokenizer_from=tokenizer_dir)
    write_checkpoint(tmp_path / "sharded", cfg, dict(reversed(list(state.items()))), shard_bytes=30_000)
    changed = dict(state)
    changed["model.layers.1.mlp.up_proj.weight"] = state["model.layers.1.mlp.up_proj.weight"].clone()
    changed["model.layers.1.mlp.up_proj.weight"][3, 7] += 1e-6
    write_checkpoint(tmp_path / "onevalue", cfg, changed)
    (tmp_path / "model.yaml").write_text("base: {path: ./base}\nvariants:\n  - {name: sharded, path: ./sharded}\n"
                                         "  - {name: onevalue, path: ./onevalue}\n")
    fp = run_passes(tmp_path / "model.yaml", "fingerprint").fingerprints
    assert [f.key for f in fp["sharded"]] == [f.key for f in fp["base"]]
    differs = [a.block for a, b in zip(fp["base"], fp["onevalue"]) if a.key != b.key]
    assert differs == ["layer.1"]


def test_tied_head_hash_follows_the_embedding(tmp_path, tokenizer_dir):
    cfg = hf_config("qwen2")
    state = random_state(cfg)
    emb_changed = perturb(state, lambda k: k == "model.embed_tokens.weight", seed=3)
    yaml = write_project(tmp_path, tokenizer_dir, {"base": state, "emb": emb_changed}, config=cfg)
    fp = run_passes(yaml, "fingerprint").fingerprints
    changed = [a.block for a, b in zip(fp["base"], fp["emb"]) if a.key != b.key]
    assert changed == ["embedding", "head"]  # the head computes with the embedding matrix


def test_adapter_deltas_per_block(tmp_path, tokenizer_dir):
    cfg = hf_config("llama")
    write_adapter(tmp_path / "a1", cfg, targets=("q_proj", "down_proj"), layers=[0, 2], seed=1)
    write_adapter(tmp_path / "a2", cfg, targets=("q_proj", "down_proj"), layers=[0, 2], seed=1)
    write_adapter(tmp_path / "a3", cfg, targets=("q_proj", "down_proj"), layers=[0, 2], seed=1, alpha=4.0)
    yaml = write_project(tmp_path, tokenizer_dir, {"base": random_state(cfg)},
                         adapters={"a1": "./a1", "a2": "./a2", "a3": "./a3"})
    program = run_passes(yaml, "fingerprint")
    d1, d2, d3 = (program.adapter_deltas[n] for n in ("a1", "a2", "a3"))
    assert sorted(d1) == ["layer.0", "layer.2"]
    assert [m.module for m in d1["layer.0"].modules] == ["mlp.down_proj", "self_attn.q_proj"]
    assert {k: v.key for k, v in d1.items()} == {k: v.key for k, v in d2.items()}
    assert all(d1[k].key != d3[k].key for k in d1)  # scaling is part of the identity
    assert program.fingerprints["a1"] == program.fingerprints["base"]
