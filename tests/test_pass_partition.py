"""Golden tests of the partition pass."""
from __future__ import annotations

import pytest
import torch
import torch.fx

from planc.errors import PlancError
from planc.ir import META_BLOCK, META_BOUNDARY
from planc.passes.partition import HFBlockPolicy, partition_graph
from tests.helpers import ids, real_model

LAYER_PARAMS = {
    "input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight",
    "self_attn.v_proj.weight", "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
    "mlp.down_proj.weight",
}


def _partition(family="llama", **overrides):
    model, _ = real_model(family, **overrides)
    gm = torch.fx.symbolic_trace(model)
    return model, gm, partition_graph(gm, HFBlockPolicy())


@torch.no_grad()
def _assert_blocks_compose(specs, model) -> None:
    """Running the block GraphModules one after another gives exactly the whole model's output."""
    x = ids()
    h = x
    for spec in specs:
        h = spec.graph(h)
    assert torch.equal(h, model(x))


def test_blocks_in_chain_order_with_boundaries():
    _, gm, specs = _partition()
    assert [s.name for s in specs] == ["embedding", "layer.0", "layer.1", "layer.2", "head"]
    for spec in specs:
        key = (spec.kind, spec.index)
        members = [n for n in gm.graph.nodes if n.meta.get(META_BLOCK) == key]
        assert [n.meta.get(META_BOUNDARY) for n in members].count("in") == 1
        assert [n.meta.get(META_BOUNDARY) for n in members].count("out") == 1
    assert all(META_BLOCK in n.meta for n in gm.graph.nodes)


def test_block_graphs_have_one_input_one_output_and_compose_to_the_model():
    model, _, specs = _partition("qwen2")
    for spec in specs:
        ops = [n.op for n in spec.graph.graph.nodes]
        assert ops.count("placeholder") == 1 and ops.count("output") == 1
    _assert_blocks_compose(specs, model)


def test_parameters_are_named_relative_to_the_block():
    _, _, specs = _partition(attention_bias=True)
    by_name = {s.name: s for s in specs}
    assert by_name["embedding"].params == {"embed_tokens.weight": "model.embed_tokens.weight"}
    bias = {p.replace(".weight", ".bias") for p in LAYER_PARAMS if "_proj" in p and "mlp" not in p}
    assert set(by_name["layer.2"].params) == LAYER_PARAMS | bias
    assert by_name["layer.2"].params["self_attn.q_proj.weight"] == "model.layers.2.self_attn.q_proj.weight"
    assert by_name["head"].params == {"norm.weight": "model.norm.weight", "lm_head.weight": "lm_head.weight"}
    assert by_name["head"].ties == {}


def test_tied_head_references_the_embedding_instead_of_owning_it():
    _, _, specs = _partition("qwen2")  # qwen2 defaults to tied embeddings in the generator
    head = specs[-1]
    assert head.params == {"norm.weight": "model.norm.weight"}
    assert head.ties == {"lm_head.weight": ("embedding", "embed_tokens.weight")}


class AttentionApartPolicy(HFBlockPolicy):
    """Puts layer 0's attention in a block of its own: the layer's residual then crosses blocks twice."""

    def block_of(self, module_path):
        if module_path.startswith("model.layers.0.self_attn"):
            return ("layer", 100)
        return super().block_of(module_path)


class PairsPolicy(HFBlockPolicy):
    """Two decoder layers per block: a policy is a parameter of the pass."""

    def block_of(self, module_path):
        block = super().block_of(module_path)
        return ("layer", block[1] // 2) if block and block[0] == "layer" else block


def test_policy_is_swappable():
    model, _ = real_model(num_hidden_layers=4)
    specs = partition_graph(torch.fx.symbolic_trace(model), PairsPolicy())
    assert [s.name for s in specs] == ["embedding", "layer.0", "layer.1", "head"]
    _assert_blocks_compose(specs, model)


def test_policy_that_breaks_the_block_contract_is_refused():
    model, _ = real_model()
    with pytest.raises(PlancError, match="not contiguous|inputs and"):
        partition_graph(torch.fx.symbolic_trace(model), AttentionApartPolicy())
