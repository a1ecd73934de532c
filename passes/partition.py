"""partition: cut each traced graph into blocks (embedding, each decoder layer, final norm + head).

Which block a node belongs to is a policy (a swappable object, like the callback of
``torch.fx.passes.split_module``). The pass records the block of every node in
``node.meta["planc.block"]``, marks the entry and exit of each block in ``node.meta["planc.boundary"]``,
and builds one GraphModule per block with exactly one tensor in and one out.
"""
from __future__ import annotations

import re
from typing import Optional, Protocol

import torch.fx
from torch import nn

from planc.errors import PlancError
from planc.ir import META_BLOCK, META_BOUNDARY, BlockSpec
from planc.pass_manager import Pass, PassContext
from planc.program import Program


class BlockPolicy(Protocol):
    def block_of(self, module_path: str) -> Optional[tuple[str, int]]:
        """(kind, index) of the block that owns a module/parameter path, or None if unknown."""
    def relative_name(self, qualified: str) -> str:
        """A parameter's name inside its block module."""


class HFBlockPolicy:
    """Blocks of a Hugging Face Llama-family module tree: model.embed_tokens | model.layers.i | model.norm + lm_head."""

    _LAYER = re.compile(r"^model\.layers\.(\d+)(?:\.|$)")

    def block_of(self, module_path: str) -> Optional[tuple[str, int]]:
        m = self._LAYER.match(module_path)
        if m:
            return "layer", int(m.group(1))
        if module_path.startswith("model.embed_tokens"):
            return "embedding", 0
        if module_path.startswith(("model.norm", "lm_head")):
            return "head", 0
        return None

    def relative_name(self, qualified: str) -> str:
        m = self._LAYER.match(qualified)
        if m:
            return qualified[m.end():]
        return qualified.removeprefix("model.")


def block_name(kind: str, index: int) -> str:
    return f"layer.{index}" if kind == "layer" else kind


def _module_path(node: torch.fx.Node) -> Optional[str]:
    if node.op in ("call_module", "get_attr"):
        return str(node.target)
    stack = node.meta.get("nn_module_stack")
    return next(reversed(stack)) if stack else None


def assign_blocks(gm: torch.fx.GraphModule, policy: BlockPolicy) -> list[tuple[str, int]]:
    """Write node.meta[META_BLOCK] for every node; return the blocks in graph order."""
    order: list[tuple[str, int]] = []
    pending: list[torch.fx.Node] = []
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            pending.append(node)
            continue
        path = _module_path(node)
        block = policy.block_of(path) if path else None
        if block is None:
            producers = [a for a in node.all_input_nodes if META_BLOCK in a.meta]
            if not producers:
                raise PlancError(f"partition: node {node.name} ({node.op} {node.target}) belongs to no block")
            block = producers[-1].meta[META_BLOCK]
        node.meta[META_BLOCK] = block
        if not order or order[-1] != block:
            if block in order:
                raise PlancError(f"partition: block {block_name(*block)} is not contiguous in the graph")
            order.append(block)
    for node in pending:  # graph inputs belong to the block that first reads them
        users = [u for u in node.users if META_BLOCK in u.meta]
        node.meta[META_BLOCK] = users[0].meta[META_BLOCK] if users else order[0]
    return order


def extract_block(gm: torch.fx.GraphModule, block: tuple[str, int]) -> tuple[torch.fx.GraphModule, list[str]]:
    """The nodes of one block as a GraphModule of its own, with one input and one output.

    Parameters keep their qualified names (the GraphModule copies what it references from `gm`).
    """
    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    inputs: list[torch.fx.Node] = []
    outputs: list[torch.fx.Node] = []
    members = [n for n in gm.graph.nodes if n.meta.get(META_BLOCK) == block and n.op != "output"]
    member_set = set(members)

    def arg(n: torch.fx.Node) -> torch.fx.Node:
        if n in env:
            return env[n]
        assert n not in member_set, n
        inputs.append(n)
        env[n] = graph.placeholder("x")
        return env[n]

    for n in members:
        if n.op == "placeholder":
            inputs.append(n)
            env[n] = graph.placeholder(n.name)
            continue
        for a in n.all_input_nodes:
            arg(a)
        env[n] = graph.node_copy(n, lambda a: env[a])
        if any(u.op == "output" or u.meta.get(META_BLOCK) != block for u in n.users):
            outputs.append(n)
    if len(inputs) != 1 or len(outputs) != 1:
        raise PlancError(f"partition: block {block_name(*block)} has {len(inputs)} inputs and {len(outputs)} outputs; "
                         "a block must take one tensor and return one")
    graph.output(env[outputs[0]])
    entry = inputs[0] if inputs[0] in member_set else next(n for n in members if inputs[0] in n.all_input_nodes)
    entry.meta[META_BOUNDARY] = "in"  # the first node of the block that reads the block's input
    outputs[0].meta[META_BOUNDARY] = "out"
    block_gm = torch.fx.GraphModule(gm, graph, class_name=f"Block_{block_name(*block).replace('.', '_')}")
    return block_gm, [n.name for n in members]


def block_parameters(gm: torch.fx.GraphModule, policy: BlockPolicy,
                     block: tuple[str, int], owner: dict[int, str]) -> tuple[dict[str, str], dict[str, tuple[str, str]]]:
    """(relative name -> checkpoint name, ties) for a block; `owner` maps tensor id -> first qualified name."""
    params: dict[str, str] = {}
    ties: dict[str, tuple[str, str]] = {}
    for node in gm.graph.nodes:
        if node.meta.get(META_BLOCK) != block or node.op not in ("call_module", "get_attr"):
            continue
        target = str(node.target)
        if node.op == "get_attr":
            attr = gm.get_parameter(target) if _is_param(gm, target) else None
            named = [(target, attr)] if attr is not None else []
        else:
            mod: nn.Module = gm.get_submodule(target)
            named = [(f"{target}.{n}", p) for n, p in mod.named_parameters(remove_duplicate=False)]
        for qualified, p in named:
            first = owner.setdefault(id(p), qualified)
            rel = policy.relative_name(qualified)
            other = policy.block_of(first)
            if first != qualified and other is not None and other != block:
                ties[rel] = (block_name(*other), policy.relative_name(first))
            else:
                params[rel] = qualified
    return params, ties


def _is_param(gm: torch.fx.GraphModule, target: str) -> bool:
    try:
        gm.get_parameter(target)
        return True
    except AttributeError:
        return False


def partition_graph(gm: torch.fx.GraphModule, policy: BlockPolicy) -> list[BlockSpec]:
    order = assign_blocks(gm, policy)
    owner: dict[int, str] = {}
    specs = []
    for block in order:
        block_gm, _ = extract_block(gm, block)
        params, ties = block_parameters(gm, policy, block, owner)
        specs.append(BlockSpec(block_name(*block), block[0], block[1], block_gm, params, ties))
    return specs


class PartitionPass(Pass):
    name = "partition"
    requires = ("graphs",)
    provides = ("blocks",)

    def __init__(self, policy: Optional[BlockPolicy] = None):
        self.policy = policy or HFBlockPolicy()

    def run(self, program: Program, ctx: PassContext) -> bool:
        done: dict[int, list[BlockSpec]] = {}
        blocks = {}
        for name, gm in program.graphs.items():
            if id(gm) not in done:
                done[id(gm)] = partition_graph(gm, self.policy)
            blocks[name] = done[id(gm)]
        program.blocks = blocks
        return True
