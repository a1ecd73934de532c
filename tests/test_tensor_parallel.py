"""Tensor parallelism executed: ranks in their own processes, joined by a real gloo process group on
127.0.0.1, each holding its shard of the blocks, give the outputs of the unsharded blocks.

Layer level: a decoder layer with every bias (q/k/v, o_proj, MLP) and a LoRA delta on all seven
projections, and a head whose vocabulary the degree does not divide. Stage level: the tiny example's
bundle (a partial fine-tune, a full one and a LoRA adapter) through prefill and greedy decode steps
with the paged KV cache, at TP 2."""
from __future__ import annotations

import multiprocessing as mp
import pickle
import traceback

import pytest
import torch

from planc.errors import PlancError
from planc.models.config import parse_arch
from planc.runtime import executor as ex
from planc.runtime.kv_cache import KVCache
from planc.runtime.stage import BlockCall
from planc.net import free_port
from planc.runtime.tensor_parallel import TensorParallel

TIMEOUT_S = 120


def _rank_main(fn, rank: int, size: int, port: int, args: tuple, results) -> None:
    try:
        torch.set_num_threads(1)
        tp = TensorParallel(rank, size)
        # plain pickle: tensors travel as bytes, not as shared memory that goes with this process
        results.put((rank, pickle.dumps(fn(tp, port, *args))))
    except BaseException:  # the parent fails the test with the rank's traceback
        results.put((rank, pickle.dumps(RuntimeError(traceback.format_exc()))))


def run_ranks(fn, size: int, *args):
    """`fn(tp, port, *args)` in `size` fresh processes (one per rank); each rank's return value."""
    ctx = mp.get_context("spawn")
    results, port = ctx.Queue(), free_port("127.0.0.1")
    procs = [ctx.Process(target=_rank_main, args=(fn, r, size, port, args, results), daemon=True) for r in range(size)]
    for p in procs:
        p.start()
    try:
        out = {rank: pickle.loads(value) for rank, value in (results.get(timeout=TIMEOUT_S) for _ in procs)}
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    for rank in sorted(out):
        if isinstance(out[rank], Exception):
            raise out[rank]
    return [out[r] for r in range(size)]


ARCH = {"model_type": "llama", "vocab_size": 33, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
        "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 16, "attention_bias": True, "mlp_bias": True,
        "rms_norm_eps": 1e-5}
"""head_dim 16 is not hidden / heads (4): a split that assumed so would fail."""
PATHS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
         "mlp.up_proj", "mlp.down_proj")


def _layer_and_inputs():
    """A random embedding, layer with every bias, head, a LoRA delta on every projection, and a ragged batch:
    one 5-token prompt with the adapter, one 3-token prompt without (the same on every process)."""
    from planc.models.llama import DecoderLayer, EmbeddingBlock, HeadBlock

    torch.manual_seed(0)
    cfg = parse_arch(ARCH, "config.json")
    embedding, layer, head = EmbeddingBlock(cfg), DecoderLayer(cfg, 0), HeadBlock(cfg)
    for p in list(embedding.parameters()) + list(layer.parameters()) + list(head.parameters()):
        torch.nn.init.normal_(p, std=0.2)
    deltas = {}
    for path in PATHS:
        lin = layer.get_submodule(path)
        deltas[path] = (torch.randn(4, lin.in_features) * 0.1, torch.randn(lin.out_features, 4) * 0.1, 0.5)
    ids = torch.tensor([0, 32, 5, 17, 16, 9, 31, 1])  # first and last rows of the vocabulary, and across ranks
    segments = [ex.Segment(0, 0, 5, 0, adapter="a"), ex.Segment(1, 5, 3, 0)]
    return cfg, embedding, layer, head, deltas, ids, segments


def _outputs(embedding, layer, head, deltas, ids, segments, cfg, tp=None):
    cache = KVCache(8, 4, cfg.num_kv_heads // (tp.size if tp else 1), cfg.head_dim, torch.float32)
    for seg in segments:
        assert cache.reserve(seg.seq, [0], seg.length)
    batch = ex.RaggedBatch(segments)
    x = ex.run_embedding(embedding, ids, tp)
    hidden = ex.run_layer(layer, 0, x, batch, cache, {"a": deltas}, tp)
    return x, hidden, ex.run_head(head, hidden, batch, tp)


def _sharded_blocks(tp: TensorParallel, port: int):
    cfg, embedding, layer, head, deltas, ids, segments = _layer_and_inputs()
    shards = [tp.shard_module(kind, block, cfg) for kind, block in
              (("embedding", embedding), ("layer", layer), ("head", head))]
    held = sum(p.numel() for p in shards[1].parameters())
    tp.join("127.0.0.1", port)
    with torch.no_grad():
        outputs = _outputs(*shards, tp.shard_adapter(deltas, cfg), ids, segments, cfg, tp)
    return outputs, held, shards[0].embed_tokens.weight.shape, shards[2].lm_head.weight.shape


@pytest.mark.parametrize("size", [2, 4])
def test_sharded_blocks_with_biases_and_lora_on_every_projection_equal_the_whole_ones(size):
    """TP 2 and 4 (8 heads, 4 KV heads: one KV head per rank at 4) over an embedding, a layer and a head
    whose vocabulary (33) neither degree divides."""
    cfg, embedding, layer, head, deltas, ids, segments = _layer_and_inputs()
    with torch.no_grad():
        expected = _outputs(embedding, layer, head, deltas, ids, segments, cfg)
    whole = sum(p.numel() for p in layer.parameters())
    norms = sum(p.numel() for n, p in layer.named_parameters() if "layernorm" in n)
    biases = layer.self_attn.o_proj.bias.numel() + layer.mlp.down_proj.bias.numel()
    rows = -(-33 // size)
    for rank, (outputs, held, embedding_shape, head_shape) in enumerate(run_ranks(_sharded_blocks, size)):
        for got, want in zip(outputs, expected):  # the embedding's rows, the layer's, the logits
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        # vocabulary rows: ceil(33 / size) each, the last rank fewer; the head pads its part with zero rows
        assert embedding_shape == (min(rows, 33 - rank * rows), 32) and head_shape == (rows, 32)
        # each rank holds its part of every projection; the norms whole; the row-split biases on rank 0 only
        assert held == (whole - norms - biases) // size + norms + (biases if rank == 0 else 0)


def test_a_degree_that_does_not_divide_the_heads_is_refused_in_one_line():
    cfg = parse_arch(ARCH, "config.json")
    with pytest.raises(PlancError, match=r"bundle: tensor parallelism 8: config.json's num_key_value_heads \(4\) "
                                         r"is not a multiple of 8"):
        TensorParallel(0, 8).check(cfg, "bundle")


def _steps(stage, bundle, prompts: dict[int, tuple[str, list[int]]], decode_steps: int, feed=None):
    """Prefill every prompt in one step, then `decode_steps` steps of one token each (the step's argmax,
    or `feed`'s tokens), as the engine batches them: per chain position one call per block instance.
    Returns each step's logits per sequence."""
    chains = {seq: bundle.variant(variant)["chain"] for seq, (variant, _) in prompts.items()}
    new = {seq: list(tokens) for seq, (_, tokens) in prompts.items()}
    done = {seq: 0 for seq in prompts}
    out = []
    for step in range(decode_steps + 1):
        for seq in prompts:
            assert stage.reserve(seq, done[seq] + len(new[seq]))
        values = {seq: torch.tensor(new[seq]) for seq in prompts}
        for position in range(len(next(iter(chains.values())))):
            by_key: dict[str, list[int]] = {}
            for seq, chain in chains.items():
                by_key.setdefault(chain[position]["block"], []).append(seq)
            for key, seqs in by_key.items():
                segments, start = [], 0
                for seq in seqs:
                    segments.append(ex.Segment(seq, start, len(new[seq]), done[seq], chains[seq][position]["adapter"]))
                    start += len(new[seq])
                values.update(stage.run_calls([BlockCall(position, key, segments)], values))
        out.append({seq: values[seq].clone() for seq in prompts})
        for seq in prompts:
            done[seq] += len(new[seq])
            new[seq] = [int(feed[step][seq]) if feed else int(values[seq].argmax())]
    return out


TINY_PROMPTS = {0: ("base", [5, 9, 2, 7]), 1: ("legal", [3, 3, 8]), 2: ("chat", [11, 4, 6, 6, 2]),
                3: ("support", [7, 1])}


@pytest.fixture(scope="module")
def qwen2_bundle(tmp_path_factory, tokenizer_dir):
    """A Qwen2-family base (head tied to the embedding, q/k/v biases) and a fine-tune of its attention's q and v
    in every layer: its layer blocks keep their MLP tensors in the base's files."""
    import planc
    from planc.example.checkpoints import hf_config, perturb, random_state
    from tests.helpers import write_project

    root = tmp_path_factory.mktemp("tp-qwen2")
    cfg = hf_config("qwen2")
    base = random_state(cfg)
    models = {"base": base, "attn": perturb(base, lambda k: "q_proj" in k or "v_proj" in k, seed=1)}
    program = planc.compile(planc.load(write_project(root, tokenizer_dir, models, config=cfg)))
    return planc.emit(program, out=root / "bundle"), {0: ("base", [5, 9, 2, 7]), 1: ("attn", [3, 3, 8, 1, 1])}


def _sharded_stage(tp: TensorParallel, port: int, bundle_dir: str, prompts, feed):
    from planc.bundle import Bundle
    from planc.runtime.stage import Stage

    bundle = Bundle.open(bundle_dir, verify=False)
    whole_blocks = []  # what the rank loads whole: nothing (it reads its part of every block)
    load = bundle.block_module
    bundle.block_module = lambda key, *a: whole_blocks.append(bundle.blocks[key]["kind"]) or load(key, *a)
    stage = Stage(bundle, range(len(bundle.variant("base")["chain"])), 1 << 20, 4, tensor_parallel=tp)
    assert whole_blocks == [], whole_blocks
    tp.join("127.0.0.1", port)
    held = sum(p.numel() for key, m in stage.modules.items() if stage.kinds.get(_position(bundle, key)) == "layer"
               for p in m.parameters())
    return _steps(stage, bundle, prompts, 4, feed), held, stage.cache.k.shape


def _position(bundle, key):
    return next(p for v in bundle.variants for p, link in enumerate(bundle.variant(v)["chain"]) if link["block"] == key)


@pytest.mark.parametrize("which", ["tiny", "qwen2"])
def test_a_bundle_at_tp_2_gives_the_unsharded_stages_logits_and_tokens(which, request):
    """The tiny example (a partial fine-tune, a full one, a LoRA adapter) and a Qwen2 bundle (tied head, q/k/v
    biases, tensors of one block in several files), every position in one stage: each rank reads only its
    parts of the layers and the head from the files, and gives the unsharded stage's logits."""
    from planc.bundle import Bundle
    from planc.runtime.stage import Stage

    bundle_dir, prompts = (request.getfixturevalue("tiny_bundle"), TINY_PROMPTS) if which == "tiny" else \
        request.getfixturevalue("qwen2_bundle")
    bundle = Bundle.open(bundle_dir)
    chain_length = len(bundle.variant("base")["chain"])
    whole = Stage(bundle, range(chain_length), 1 << 20, 4)
    expected = _steps(whole, bundle, prompts, 4)
    feed = [{seq: int(logits.argmax()) for seq, logits in step.items()} for step in expected]
    held_whole = sum(p.numel() for key, m in whole.modules.items() if whole.kinds.get(_position(bundle, key)) == "layer"
                     for p in m.parameters())
    for steps, held, kv_shape in run_ranks(_sharded_stage, 2, str(bundle_dir), prompts, feed):
        assert kv_shape[2] == bundle.arch.num_kv_heads // 2
        assert held < 0.6 * held_whole  # half of every projection (the norms stay whole)
        for got, want in zip(steps, expected):
            for seq in prompts:
                torch.testing.assert_close(got[seq], want[seq], rtol=1e-4, atol=1e-4)
                assert int(got[seq].argmax()) == int(want[seq].argmax())
