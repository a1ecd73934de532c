"""trace: one torch.fx GraphModule per model, traced on the meta device (no weights needed).

Models with equal architectures share one graph: the graph is a function of config.json only;
weights are bound per model by the later passes.
"""
from __future__ import annotations

import torch.fx

from planc.ir import GRAPH_META_ARCH
from planc.models.config import ArchConfig
from planc.models.llama import build_model
from planc.pass_manager import Pass, PassContext
from planc.program import Program


def trace_architecture(arch: ArchConfig) -> torch.fx.GraphModule:
    """Symbolically trace planc's model for `arch` on the meta device."""
    model = build_model(arch, device="meta")
    gm = torch.fx.symbolic_trace(model)
    gm.meta[GRAPH_META_ARCH] = arch
    return gm


class TracePass(Pass):
    name = "trace"
    provides = ("graphs",)

    def run(self, program: Program, ctx: PassContext) -> bool:
        by_arch: dict[ArchConfig, torch.fx.GraphModule] = {}
        graphs = {}
        for name, entry in program.models.items():
            arch = entry.checkpoint.arch
            if arch not in by_arch:
                by_arch[arch] = trace_architecture(arch)
            graphs[name] = by_arch[arch]
        program.graphs = graphs
        return True
