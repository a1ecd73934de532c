"""What the simulator needs to know about a deployment: each variant's chain and each block's cost.

A `SimModel` is plain data, so the planner can build one from config.json alone (no weights), and
`SimModel.from_bundle` builds one from a compiled bundle. It precomputes, per chain position, how
the variants group into block instances (variants whose block key is the same share one batched
call) and collapses positions whose grouping and costs are identical: a 70B model whose 80 layers
are shared by every variant costs one group per step to simulate, not 80.

>>> from planc.cost import BlockCost
>>> layer = BlockCost("layer", linear_flops_per_token=1e6, kv_bytes_per_token=256.0)
>>> m = SimModel.from_data({"a": [("L0", None), ("L1", None)], "b": [("L0", None), ("L1b", None)]},
...                        {"L0": layer, "L1": layer, "L1b": layer})
>>> [(count, len(groups)) for count, groups in m.positions]   # L0 shared; L1/L1b one call each
[(1, 1), (1, 2)]
>>> m.num_kv_layers, m.kv_bytes_per_token
(2, 256.0)
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

from planc.cost import BlockCost

Link = tuple[str, Optional[str]]
"""(block key, adapter key or None) at one chain position."""


@dataclass(frozen=True)
class Group:
    """The variants whose chain has the same block instance at a position: one batched call."""

    cost: BlockCost
    variants: tuple[int, ...]
    """Indices into SimModel.variants."""
    adapters: tuple[tuple[BlockCost, tuple[int, ...]], ...] = ()
    """(delta cost, variants using that adapter): one extra grouped call per adapter, as the runtime does."""


@dataclass(frozen=True)
class SimModel:
    variants: tuple[str, ...]
    chains: Mapping[str, tuple[Link, ...]]
    costs: Mapping[str, BlockCost]
    adapter_costs: Mapping[str, BlockCost]
    positions: tuple[tuple[int, tuple[Group, ...]], ...] = field(init=False)
    """(number of positions, groups) for each distinct position: the per-step work in compressed form."""
    num_kv_layers: int = field(init=False)
    """Chain positions holding KV (every chain has the same number: one architecture)."""
    kv_bytes_per_token: float = field(init=False)
    """K+V bytes of one token in one layer: the engine's page size unit."""

    def __post_init__(self) -> None:
        lengths = {len(c) for c in self.chains.values()}
        if len(lengths) != 1:
            raise ValueError(f"chains must all have the same length (one architecture); got lengths {sorted(lengths)}")
        for name, chain in self.chains.items():
            for key, adapter in chain:
                if key not in self.costs:
                    raise ValueError(f"variant {name}: no cost for block {key!r}")
                if adapter is not None and adapter not in self.adapter_costs:
                    raise ValueError(f"variant {name}: no cost for adapter {adapter!r}")
        first = self.chains[self.variants[0]]
        kv = [self.costs[key].kv_bytes_per_token for key, _ in first if self.costs[key].kv_bytes_per_token > 0]
        object.__setattr__(self, "num_kv_layers", len(kv))
        object.__setattr__(self, "kv_bytes_per_token", max(kv, default=0.0))
        object.__setattr__(self, "positions", self._compress())

    @classmethod
    def from_data(cls, chains: Mapping[str, Sequence[Link]], costs: Mapping[str, BlockCost],
                  adapter_costs: Optional[Mapping[str, BlockCost]] = None) -> "SimModel":
        """From plain data: variant -> [(block key, adapter key or None)], block key -> BlockCost."""
        if not chains:
            raise ValueError("a SimModel needs at least one variant")
        return cls(tuple(chains), {n: tuple((k, a) for k, a in c) for n, c in chains.items()}, dict(costs),
                   dict(adapter_costs or {}))

    @classmethod
    def from_bundle(cls, bundle, dtype_bytes: Optional[int] = None) -> "SimModel":
        """Chains, block costs (traced on meta from the bundle's architecture) and adapter ranks of a bundle."""
        from planc.cost import arch_block_costs

        arch = bundle.arch
        dtype_bytes = dtype_bytes or arch.dtype_bytes
        by_name = arch_block_costs(arch, dtype_bytes)
        costs = {key: by_name[entry["name"]] for key, entry in bundle.blocks.items()}
        dims = linear_dims(arch)
        adapters = {key: adapter_cost([(m["rank"], dims[m["module"]]) for m in entry["modules"]], dtype_bytes)
                    for key, entry in bundle.adapters.items()}
        chains = {name: [(link["block"], link["adapter"]) for link in v["chain"]] for name, v in bundle.variants.items()}
        return cls.from_data(chains, costs, adapters)

    def _compress(self) -> tuple[tuple[int, tuple[Group, ...]], ...]:
        index = {name: i for i, name in enumerate(self.variants)}
        counts: Counter = Counter()
        for p in range(len(self.chains[self.variants[0]])):
            by_key: dict[str, list[str]] = {}
            for name in self.variants:
                by_key.setdefault(self.chains[name][p][0], []).append(name)
            groups = []
            for key, names in by_key.items():
                by_adapter: dict[str, list[int]] = {}
                for name in names:
                    adapter = self.chains[name][p][1]
                    if adapter is not None:
                        by_adapter.setdefault(adapter, []).append(index[name])
                # adapters are keyed by cost, not identity: two same-shaped adapters cost the same
                deltas = tuple(sorted(((self.adapter_costs[a], tuple(v)) for a, v in by_adapter.items()),
                                      key=lambda d: d[1]))
                groups.append(Group(self.costs[key], tuple(index[n] for n in names), deltas))
            counts[tuple(sorted(groups, key=lambda g: g.variants))] += 1
        return tuple((n, groups) for groups, n in counts.items())




def linear_dims(arch) -> dict[str, float]:
    """Module path inside a decoder layer -> in + out features (what a LoRA delta on it costs per rank)."""
    q, kv, h, i = arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim, arch.hidden_size, \
        arch.intermediate_size
    return {"self_attn.q_proj": h + q, "self_attn.k_proj": h + kv, "self_attn.v_proj": h + kv,
            "self_attn.o_proj": q + h, "mlp.gate_proj": h + i, "mlp.up_proj": h + i, "mlp.down_proj": i + h}


def adapter_cost(modules: Sequence[tuple[int, float]], dtype_bytes: int) -> BlockCost:
    """The delta of one adapter on one block: (rank, in + out) per adapted Linear."""
    cost = BlockCost("adapter", linear_flops_per_token=0.0)
    for rank, in_out in modules:
        cost = cost.with_lora(rank, 1, in_out, dtype_bytes)
    return cost
