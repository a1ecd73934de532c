"""Golden tests of the trace pass."""
from __future__ import annotations

import torch
import torch.fx

from planc.ir import GRAPH_META_ARCH
from planc.passes.trace import trace_architecture
from tests.helpers import arch_of, ids, real_model, run_passes, write_project
from planc.example.checkpoints import hf_config, perturb, random_state, top_layers

# One decoder layer as the traced graph must show it: the kernel ops are single nodes.
EXPECTED_LAYER_OPS = [
    "rms_norm", "getattr", "getitem", "getattr", "getitem",
    "self_attn.q_proj", "view", "transpose", "self_attn.k_proj", "view", "transpose",
    "self_attn.v_proj", "view", "transpose", "getattr", "arange", "inv_freq", "getattr", "rope_cos_sin",
    "getitem", "getitem", "apply_rotary", "getitem", "getitem", "attention", "transpose", "reshape",
    "self_attn.o_proj", "add", "post_attention_layernorm.weight", "rms_norm",
    "mlp.gate_proj", "mlp.up_proj", "silu_mul", "mlp.down_proj", "add",
]


def _op(node: torch.fx.Node) -> str:
    if node.op in ("call_module", "get_attr"):
        return str(node.target).split("layers.1.", 1)[-1].replace("self_attn.inv_freq", "inv_freq")
    if node.op == "call_method":
        return str(node.target)
    return getattr(node.target, "__name__", str(node.target))


def test_traced_layer_matches_golden_op_sequence():
    gm = trace_architecture(arch_of())
    layer = [n for n in gm.graph.nodes if any(k.startswith("model.layers.1") for k in
                                             (n.meta.get("nn_module_stack") or {}))
             or str(n.target).startswith("model.layers.1.")]
    ops = [_op(n) for n in layer if not (n.op == "get_attr" and n.target.endswith("input_layernorm.weight"))]
    assert ops == EXPECTED_LAYER_OPS


def test_trace_is_on_meta_and_records_arch():
    arch = arch_of("qwen2")
    gm = trace_architecture(arch)
    assert gm.meta[GRAPH_META_ARCH] == arch
    assert all(p.is_meta for p in gm.parameters())


def test_traced_graph_computes_the_model():
    model, _ = real_model("mistral", sliding_window=4)
    gm = torch.fx.symbolic_trace(model)
    x = ids()
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))


def test_equal_architectures_share_one_graph(tmp_path, tokenizer_dir):
    cfg = hf_config("llama")
    base = random_state(cfg)
    yaml = write_project(tmp_path, tokenizer_dir, {"base": base, "ft": perturb(base, top_layers(3, 1), 1)})
    program = run_passes(yaml, "trace")
    assert program.graphs["base"] is program.graphs["ft"]
    assert [r.name for r in program.log] == ["trace"]


def test_trace_needs_no_weights(tmp_path, tokenizer_dir):
    """Plan-only: load with weights=False reads config.json alone; tracing still works."""
    import planc

    cfg = hf_config("llama", num_hidden_layers=80, hidden_size=512, intermediate_size=1024, num_attention_heads=8,
                    num_key_value_heads=2)
    (tmp_path / "big").mkdir()
    (tmp_path / "big" / "config.json").write_text(__import__("json").dumps(cfg))
    (tmp_path / "model.yaml").write_text("base: {path: ./big}\n")
    program = planc.load(tmp_path / "model.yaml", weights=False)
    program = planc.compile(program, passes=[p for p in planc.default_pipeline() if p.name in ("trace", "partition")])
    assert len(program.blocks["base"]) == 82
