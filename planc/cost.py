"""Cost model: per-block FLOPs, bytes and time on a device, from the traced graph.

`analyze_block` runs torch.fx ShapeProp over a block's GraphModule on meta tensors and reads the
work off the nodes: every Linear (2 * in * out FLOPs per token), every attention call (4 * heads *
head_dim FLOPs per query/key pair, K/V bytes per cached token), elementwise traffic, weight bytes.
`CostModel.block_time` turns that into seconds for one batched call of planc's runtime: roofline
(max of compute and memory time at the device's achieved efficiency) plus the runtime's fixed
overheads from the profile, plus the tensor-parallel all-reduces over the node's links.

>>> from planc.cluster import load_device
>>> cm = CostModel(load_device("H100-80GB"), dtype_bytes=2)
>>> layer = BlockCost("layer", linear_flops_per_token=2 * 218e6, attn_flops_per_pair=4 * 64 * 128,
...                   kv_bytes_per_token=2 * 2 * 8 * 128, act_bytes_per_token=8192 * 2 * 12,
...                   weight_bytes=436e6 * 2, hidden_size=8192, num_allreduce=2)
>>> 0.0002 < cm.block_time(layer, tp=1, decode_seqs=1, context_tokens=1000) < 0.001  # weight-bound
True
"""
from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, replace
from typing import Optional

import torch
import torch.fx
from torch.fx.passes.shape_prop import ShapeProp

from planc.cluster import Cluster, DeviceProfile, Links
from planc.ir import BlockSpec
from planc.models import llama
from planc.models.config import ArchConfig

_ELEMENTWISE = {"rms_norm": 3, "silu_mul": 3, "add": 3, "apply_rotary": 3}
"""Wrapped op -> tensors of its output size it reads/writes, for elementwise memory traffic."""


@dataclass(frozen=True)
class BlockCost:
    """The work of one block per token (from its graph); independent of the device."""

    kind: str
    linear_flops_per_token: float
    attn_flops_per_pair: float = 0.0
    """FLOPs per (query token, attended key token)."""
    kv_bytes_per_token: float = 0.0
    """K and V bytes one cached token takes in this block."""
    act_bytes_per_token: float = 0.0
    """Elementwise/activation memory traffic per token."""
    weight_bytes: float = 0.0
    read_bytes_per_token: float = 0.0
    """Weight bytes read per token that are not streamed once per call (embedding rows)."""
    hidden_size: int = 0
    num_allreduce: int = 0
    """All-reduces per call under tensor parallelism (Megatron: one after attention, one after MLP)."""
    window: Optional[int] = None
    linears: tuple[tuple[int, int], ...] = ()
    """(out_features, in_features) of every Linear the block runs, for a device's measured matmul table."""
    tp: int = 1
    """Tensor-parallel degree the block runs at (a plan's layout); block_time uses the larger of this and
    its own `tp` argument, so a simulator that knows nothing of TP still sees the plan's."""

    def with_lora(self, rank: int, num_modules: int, in_out: float, dtype_bytes: int) -> "BlockCost":
        """The block plus a LoRA delta of `rank` on `num_modules` Linears of average in+out `in_out`."""
        extra_flops = 2.0 * rank * in_out * num_modules
        return replace(self, linear_flops_per_token=self.linear_flops_per_token + extra_flops,
                       weight_bytes=self.weight_bytes + rank * in_out * num_modules * dtype_bytes)


def _nbytes(meta) -> int:
    return math.prod(meta.shape) * meta.dtype.itemsize if meta is not None and hasattr(meta, "shape") else 0


def analyze_block(block: BlockSpec, hidden_size: int, dtype_bytes: int, tokens: int = 8) -> BlockCost:
    """Propagate meta shapes through the block's graph for `tokens` tokens and count its work."""
    gm = block.graph
    if block.kind == "embedding":
        example = torch.zeros(1, tokens, dtype=torch.long, device="meta")
    else:
        example = torch.zeros(1, tokens, hidden_size, device="meta")
    ShapeProp(gm).propagate(example)
    modules = dict(gm.named_modules())
    linear_flops = attn_pair = kv_bytes = act_bytes = 0.0
    window, linears = None, []
    for node in gm.graph.nodes:
        meta = node.meta.get("tensor_meta")
        if node.op == "call_module" and isinstance(modules.get(node.target), torch.nn.Linear):
            lin = modules[node.target]
            linear_flops += 2.0 * lin.in_features * lin.out_features
            linears.append((lin.out_features, lin.in_features))
        elif node.op == "call_function" and node.target is llama.attention:
            q_meta, k_meta = node.args[0].meta["tensor_meta"], node.args[1].meta["tensor_meta"]
            _, heads, _, head_dim = q_meta.shape
            _, kv_heads, _, _ = k_meta.shape
            attn_pair += 4.0 * heads * head_dim
            kv_bytes += 2.0 * kv_heads * head_dim * dtype_bytes
            window = node.args[3]
        elif node.op == "call_function":
            name = getattr(node.target, "__name__", "")
            if name in _ELEMENTWISE:
                act_bytes += _ELEMENTWISE[name] * _nbytes(meta) / tokens / 4 * dtype_bytes  # meta is fp32
    weight_bytes = sum(p.numel() for p in gm.parameters()) * dtype_bytes
    return BlockCost(kind=block.kind, linear_flops_per_token=linear_flops, attn_flops_per_pair=attn_pair,
                     kv_bytes_per_token=kv_bytes, act_bytes_per_token=act_bytes, weight_bytes=weight_bytes,
                     # a lookup reads only the rows it needs; block_time never streams its table
                     read_bytes_per_token=hidden_size * dtype_bytes if block.kind == "embedding" else 0.0,
                     hidden_size=hidden_size,
                     num_allreduce={"layer": 2, "head": 1}.get(block.kind, 0), window=window,
                     linears=tuple(linears))


@functools.lru_cache(maxsize=8)
def arch_block_costs(arch: ArchConfig, dtype_bytes: int) -> dict[str, BlockCost]:
    """Block name -> BlockCost for every block of `arch`, from traced graphs on meta.

    Decoder layers differ only in their attention window, so one single-layer model is traced per
    distinct window (an 80-layer model would cost seconds to trace for 80 identical answers).
    """
    from planc.passes.partition import HFBlockPolicy, partition_graph
    from planc.passes.trace import trace_architecture

    by_window: dict[Optional[int], dict[str, BlockCost]] = {}
    for window in dict.fromkeys(arch.sliding_windows):
        one = dataclasses.replace(arch, num_layers=1, sliding_windows=(window,))
        blocks = partition_graph(trace_architecture(one), HFBlockPolicy())
        by_window[window] = {b.kind: analyze_block(b, arch.hidden_size, dtype_bytes) for b in blocks}
    first = by_window[arch.sliding_windows[0]]
    out = {"embedding": first["embedding"]}
    for i, window in enumerate(arch.sliding_windows):
        out[f"layer.{i}"] = by_window[window]["layer"]
    out["head"] = first["head"]
    return out


class CostModel:
    """Seconds for one batched block call on a device (roofline + runtime overheads + TP all-reduce)."""

    def __init__(self, device: DeviceProfile, dtype_bytes: int = 2, dtype: Optional[str] = None,
                 links: Optional[Links] = None):
        self.device = device
        self.dtype_bytes = dtype_bytes
        self.dtype = dtype or {1: "fp8", 2: "bf16", 4: "fp32"}[dtype_bytes]
        self.peak = device.flops(self.dtype) * device.matmul_efficiency
        table = device.matmul_table
        self.table = table if table is not None and table.dtype == self.dtype else None
        """The device's measured matmul table when it was measured in this dtype."""
        self.bandwidth = device.mem_bw_gbps * 1e9 * device.bw_efficiency
        self.links = links or Links()

    @classmethod
    def for_cluster(cls, cluster: Cluster, dtype_bytes: int = 2) -> "CostModel":
        return cls(cluster.device, dtype_bytes, links=cluster.links)

    def block_time(self, cost: BlockCost, tp: int = 1, prefill_tokens: int = 0, decode_seqs: int = 0,
                   context_tokens: float = 0.0, attn_pairs: Optional[float] = None,
                   num_seqs: Optional[int] = None) -> float:
        """One call of `cost`'s block over a batch: `prefill_tokens` new prompt tokens plus one token
        for each of `decode_seqs` decoding sequences whose contexts sum to `context_tokens`.

        `attn_pairs` (query/key pairs) defaults to the decode contexts plus a causal square per
        prefill token block; pass it when the prefill lengths are known (sum of L*(L+1)/2).
        """
        tokens = prefill_tokens + decode_seqs
        if tokens == 0:
            return 0.0
        tp = max(tp, cost.tp)
        if attn_pairs is None:
            attn_pairs = context_tokens + prefill_tokens * (prefill_tokens + 1) / 2
        if cost.window is not None:
            attn_pairs = min(attn_pairs, tokens * cost.window)
        kv_read = (context_tokens + prefill_tokens) * cost.kv_bytes_per_token
        other_bytes = kv_read + tokens * (cost.act_bytes_per_token + cost.read_bytes_per_token)
        attn_flops = attn_pairs * cost.attn_flops_per_pair
        if self.table is not None and cost.linears:
            # measured Linears, then the rest (attention, KV, elementwise) on the roofline: one thread runs
            # them one after the other
            compute = self.linears_time(cost, tokens, tp) + \
                max(attn_flops / (tp * self.peak), other_bytes / (tp * self.bandwidth))
        else:
            flops = tokens * cost.linear_flops_per_token + attn_flops
            streamed = 0.0 if cost.kind == "embedding" else cost.weight_bytes
            compute = max(flops / (tp * self.peak), (streamed + other_bytes) / (tp * self.bandwidth))
        return compute + self.overhead_time(prefill_tokens, decode_seqs, num_seqs) + \
            self.allreduce_time(cost, tp, tokens)

    def linears_time(self, cost: BlockCost, rows: int, tp: int = 1) -> float:
        """The block's Linears over `rows` rows from the device's matmul table (each weight's out features
        split `tp` ways, as column-parallel layers are; the table is measured per device)."""
        assert self.table is not None
        return sum(self.table.linear_us(rows, max(1, out // tp), k) for out, k in cost.linears) * 1e-6

    def overhead_time(self, prefill_tokens: int = 0, decode_seqs: int = 0, num_seqs: Optional[int] = None) -> float:
        """The runtime's fixed costs of one block call (Python and launches; the profile's overheads).

        A simulator of `planc serve` treats this as the part of a call that holds the GIL: the roofline
        part runs inside torch ops, which release it."""
        ov = self.device.overheads
        seqs = num_seqs if num_seqs is not None else decode_seqs + (1 if prefill_tokens else 0)
        return (ov.block_call_us + ov.per_seq_us * seqs + ov.per_token_us * prefill_tokens) * 1e-6

    def allreduce_time(self, cost: BlockCost, tp: int, tokens: int) -> float:
        """Ring all-reduce of the block's output, `num_allreduce` times, inside one node."""
        if tp <= 1 or cost.num_allreduce == 0:
            return 0.0
        size = tokens * cost.hidden_size * self.dtype_bytes
        per = 2 * (tp - 1) / tp * size / (self.links.intra_node_gbps * 1e9) + \
            2 * (tp - 1) * self.links.latency_us * 1e-6
        return cost.num_allreduce * per

    def transfer_time(self, tokens: int, hidden_size: int, inter_node: bool = False) -> float:
        """A pipeline hop: one activation tensor between stages."""
        gbps = self.links.inter_node_gbps if inter_node else self.links.intra_node_gbps
        return tokens * hidden_size * self.dtype_bytes / (gbps * 1e9) + self.links.latency_us * 1e-6

    def step_overhead(self) -> float:
        return self.device.overheads.step_us * 1e-6
