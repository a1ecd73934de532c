"""Embedding rows read from the bundle file (planc.runtime.file_rows) and the executor's row-chunked MLP."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from planc.bundle import Bundle
from planc.models.safetensors_index import read_header
from planc.runtime import executor as ex
from planc.runtime.file_rows import FileRows
from planc.runtime.stage import Stage


def _table(tmp_path: Path, rows: int, dim: int, dtype=torch.float32) -> tuple[Path, torch.Tensor]:
    table = torch.randn(rows, dim, generator=torch.Generator().manual_seed(0)).to(dtype)
    path = tmp_path / "emb.safetensors"
    save_file({"other": torch.ones(3), "embed_tokens.weight": table}, str(path))
    return path, table


def _resident_kib(path: Path) -> int:
    """Rss of this process's mappings of `path`, from /proc/self/smaps."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if head and "-" in head[0] and ":" not in head[0]:
            inside = len(head) >= 6 and head[5] == str(path)
        elif inside and line.startswith("Rss:"):
            total += int(head[1])
    return total


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_equal_the_embedding_lookup(tmp_path, dtype):
    path, table = _table(tmp_path, 300, 24, dtype)
    rows = FileRows(read_header(path)["embed_tokens.weight"])
    ids = torch.tensor([[5, 299, 5, 0], [7, 7, 7, 1]])
    got = rows(ids)
    assert got.shape == (2, 4, 24) and got.dtype == dtype
    assert torch.equal(got, torch.nn.functional.embedding(ids, table))
    with pytest.raises(IndexError, match="300"):
        rows(torch.tensor([1, 300]))


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs /proc/self/smaps")
def test_lookups_leave_the_mapped_table_not_resident(tmp_path):
    path, table = _table(tmp_path, 4096, 1024)  # 16 MiB
    mapped = load_file(str(path))["embed_tokens.weight"]  # as Bundle loads a block: a memory map of the file
    rows = FileRows(read_header(path)["embed_tokens.weight"])
    before = _resident_kib(path)  # the header's pages (and those the kernel maps around them)
    assert before < 256
    ids = torch.randint(0, 4096, (512,), generator=torch.Generator().manual_seed(1))
    assert torch.equal(rows(ids), table[ids])
    assert _resident_kib(path) == before
    mapped[ids].sum()  # the same lookup through the map makes its pages resident: the check can fail
    assert _resident_kib(path) > before + 1024


def test_stage_reads_untied_embedding_rows_from_the_file(tiny_bundle):
    bundle = Bundle.open(tiny_bundle)
    stage = Stage(bundle, range(0, 1), 1 << 20, 16)
    assert set(stage.file_rows) == set(stage.modules)  # every variant's embedding (the full fine-tune has its own)
    ids = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6])
    segments = [ex.Segment(seq=0, start=0, length=8, position=0)]
    for key in stage.file_rows:
        assert not bundle.read_by_other_blocks(key, "embed_tokens.weight")
        assert torch.equal(stage.run(0, key, ids, segments), stage.modules[key].embed_tokens(ids))


def test_a_tied_embedding_keeps_its_memory_map(tiny_bundle):
    bundle = Bundle.open(tiny_bundle)
    key = next(k for k, b in bundle.blocks.items() if b["kind"] == "embedding")
    head = next(b for b in bundle.blocks.values() if b["kind"] == "head")
    head["ties"] = {"lm_head.weight": [bundle.blocks[key]["name"], "embed_tokens.weight"]}  # as a tied model's
    assert bundle.read_by_other_blocks(key, "embed_tokens.weight")


def test_row_chunked_mlp_equals_the_whole_batch_with_adapters_across_chunks(tiny_bundle, monkeypatch):
    bundle = Bundle.open(tiny_bundle)
    key = next(k for k, b in bundle.blocks.items() if b["kind"] == "layer")
    mlp = bundle.block_module(key).mlp
    hidden, inter = mlp.gate_proj.in_features, mlp.gate_proj.out_features
    gen = torch.Generator().manual_seed(2)
    adapters = {"a": {"mlp.gate_proj": (torch.randn(4, hidden, generator=gen), torch.randn(inter, 4, generator=gen), 2.0),
                      "mlp.down_proj": (torch.randn(4, inter, generator=gen), torch.randn(hidden, 4, generator=gen), 0.5)},
                "b": {"mlp.up_proj": (torch.randn(2, hidden, generator=gen), torch.randn(inter, 2, generator=gen), 1.0)}}
    # segments of 3, 6 (adapter a: rows 3..8, across the chunk edges at 4 and 8), 2 (b) and 4 tokens
    lengths, owners = [3, 6, 2, 4], [None, "a", "b", None]
    starts = [sum(lengths[:i]) for i in range(4)]
    batch = ex.RaggedBatch([ex.Segment(i, s, n, 0, a) for i, (s, n, a) in enumerate(zip(starts, lengths, owners))])
    h = torch.randn(sum(lengths), hidden, generator=gen)
    whole = ex._mlp(mlp, h, batch, adapters)
    monkeypatch.setattr(ex, "MLP_CHUNK_ROWS", 4)
    chunked = ex._mlp(mlp, h, batch, adapters)
    # fp32 sums in another order (chunks of other row counts take other matmul kernels, e.g. with AVX-512):
    # an error relative to the terms' size (up to ~700 here), not to each output's
    assert torch.allclose(chunked, whole, atol=1e-6 * whole.abs().max().item(), rtol=1e-5)
    plain = ex._mlp(mlp, h, ex.RaggedBatch([ex.Segment(0, 0, h.shape[0], 0)]), adapters)
    assert not torch.allclose(plain[3:11], whole[3:11], atol=1e-3)  # the adapters do change these rows
