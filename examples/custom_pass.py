"""A custom pass, plugged in without editing planc: how many bytes each variant keeps to itself.

For tenant isolation and capacity planning it matters how much of a variant is private (blocks no
other variant uses, plus its adapter deltas). This pass reads the block zoo and chains that
`dedupe` wrote and records, per variant, its private bytes and its share of the stored total.

Use it from model.yaml:

    passes: ["../custom_pass.py:PrivateBytes"]

or from Python:

    import planc
    from custom_pass import PrivateBytes
    program = planc.compile(planc.load("model.yaml"), passes=planc.default_pipeline() + [PrivateBytes()])
    program.extras["private_bytes"]   # {"base": ..., "legal": ..., ...}

The result also lands in the bundle's manifest under `annotations.private_bytes`.
"""
from __future__ import annotations

import planc


class PrivateBytes(planc.Pass):
    name = "private_bytes"
    requires = ("zoo", "adapter_zoo", "chains")
    provides = ("private_bytes",)
    after = ("dedupe",)

    def run(self, program: planc.Program, ctx: planc.PassContext) -> bool:
        stored = sum(b.nbytes for b in program.zoo.values()) + sum(d.nbytes for d in program.adapter_zoo.values())
        result = {}
        for name, chain in program.chains.items():
            private = sum(program.zoo[link.block].nbytes for link in chain.links
                          if set(program.zoo[link.block].users) == {name})
            private += sum(program.adapter_zoo[link.adapter].nbytes for link in chain.links if link.adapter)
            result[name] = {"private_bytes": private, "share_of_stored": round(private / stored, 6)}
        program.extras["private_bytes"] = result
        return False
