"""Torch reference ops against independent formulas, and the dispatch registry."""
from __future__ import annotations

import math

import pytest
import torch

import planc.kernels as K
from planc.errors import PlancError
from planc.kernels.dispatch import KernelRegistry, KernelSelection


def test_rms_norm_computes_in_fp32_and_casts_back():
    x = torch.randn(3, 5, 24, dtype=torch.bfloat16)
    w = torch.randn(24, dtype=torch.bfloat16)
    x32 = x.float()
    want = w * (x32 / torch.sqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16)
    got = K.rms_norm(x, w, 1e-6)
    assert got.dtype == torch.bfloat16
    assert torch.allclose(got.float(), want.float(), atol=1e-2)


def _naive_attention(q, k, v, window, scale):
    # q: (batch, heads, seq, dim); k, v: (batch, kv_heads, seq, dim)
    b, h, s, d = q.shape
    groups = h // k.shape[1]
    out = torch.zeros_like(q)
    for bi in range(b):
        for hi in range(h):
            kv = hi // groups
            for i in range(s):
                lo = 0 if window is None else max(0, i - window + 1)
                scores = torch.tensor([float(q[bi, hi, i] @ k[bi, kv, j]) * scale for j in range(lo, i + 1)])
                p = torch.softmax(scores, 0)
                out[bi, hi, i] = sum(p[j - lo] * v[bi, kv, j] for j in range(lo, i + 1))
    return out


@pytest.mark.parametrize("heads, kv_heads, window", [(4, 4, None), (4, 1, None), (8, 2, 3), (8, 8, 1)])
def test_attention_is_causal_grouped_and_windowed(heads, kv_heads, window):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, heads, 7, 6, generator=g)
    k = torch.randn(2, kv_heads, 7, 6, generator=g)
    v = torch.randn(2, kv_heads, 7, 6, generator=g)
    got = K.attention(q, k, v, window, 1 / math.sqrt(6))
    assert torch.allclose(got, _naive_attention(q, k, v, window, 1 / math.sqrt(6)), atol=1e-5)


def test_rotary_rotates_pairs_by_position_angle():
    inv_freq = torch.tensor([1.0, 0.1])
    cos, sin = K.rope_cos_sin(torch.arange(3), inv_freq, 1.0, torch.float32)
    q = torch.tensor([1.0, 0.0, 0.0, 0.0]).expand(1, 1, 3, 4)
    rq, _ = K.apply_rotary(q, q[:, :1], cos, sin)
    # The first half pairs with the second half: (x0, x2) rotates by angle position * inv_freq[0].
    for pos in range(3):
        assert rq[0, 0, pos, 0].item() == pytest.approx(math.cos(pos))
        assert rq[0, 0, pos, 2].item() == pytest.approx(math.sin(pos))


def test_silu_mul():
    g, u = torch.randn(10), torch.randn(10)
    assert torch.allclose(K.silu_mul(g, u), g / (1 + torch.exp(-g)) * u, atol=1e-6)


def test_registry_and_selection_pick_per_op():
    reg = KernelRegistry.builtin()
    reg.register("silu_mul", "double", lambda g, u: 2 * g)
    sel = KernelSelection.parse("torch,silu_mul=double", registry=reg)
    assert sel.call("silu_mul", torch.ones(1), None).item() == 2.0
    with K.use_kernels(sel):
        assert K.silu_mul(torch.ones(1), None).item() == 2.0
    assert K.silu_mul(torch.ones(1), torch.ones(1)).item() == pytest.approx(0.7310586)  # outside: auto
    assert sel.choice("rms_norm") == "torch"
    # A bare default applies where it exists: prefill attention has no Triton kernel and stays auto.
    triton_everywhere = KernelSelection.parse("triton")
    assert triton_everywhere.choice("decode_attention") == "triton" and triton_everywhere.choice("attention") == "auto"
    with pytest.raises(ValueError, match="no implementation 'triton'"):
        KernelSelection.parse("attention=triton")
    with pytest.raises(ValueError, match="unknown kernel op"):
        KernelSelection.parse("conv=torch")
    with pytest.raises(ValueError, match="not one of"):
        KernelSelection.parse("cuda")
    with pytest.raises(KeyError, match="unknown op"):
        reg.register("conv", "x", print)


def test_auto_uses_torch_on_cpu_tensors_and_env_selects(monkeypatch):
    monkeypatch.delenv("PLANC_KERNELS", raising=False)
    assert K.current().choice("rms_norm") == "auto"
    monkeypatch.setenv("PLANC_KERNELS", "rms_norm=torch,decode_attention=triton")
    assert K.current().choice("rms_norm") == "torch" and K.current().choice("decode_attention") == "triton"
    with K.use_kernels(KernelSelection.parse("")):
        assert K.current().choice("decode_attention") == "auto"  # an explicit selection wins over the env


def test_tuned_impl_applies_per_shape_class_unless_overridden(tmp_path):
    calls = []
    reg = KernelRegistry.builtin()
    reg.register("rms_norm", "spy", K.dispatch.Impl(lambda x, w, eps, config: calls.append(config) or x,
                                                     tunable=True))
    table = {"rms_norm": {"fp32,hidden=8": {"impl": "spy", "BLOCK": 8}}}
    sel = KernelSelection(reg, {}, table)
    sel.call("rms_norm", torch.ones(2, 8), torch.ones(8), 1e-6)
    sel.call("rms_norm", torch.ones(2, 4), torch.ones(4), 1e-6)  # another class: auto (torch)
    assert calls == [{"impl": "spy", "BLOCK": 8}]
    KernelSelection(reg, {"rms_norm": "torch"}, table).call("rms_norm", torch.ones(2, 8), torch.ones(8), 1e-6)
    assert len(calls) == 1
    (tmp_path / "kernels.json").write_text('{"rms_norm": {"*": {"impl": "torch"}}}')
    assert K.load_tuned(tmp_path / "kernels.json") == {"rms_norm": {"*": {"impl": "torch"}}}
    (tmp_path / "bad.json").write_text('{"rms_norm": {"*": {"impl": "torch", "BLOCK": -1}}}')
    with pytest.raises(PlancError, match="BLOCK must be positive"):
        K.load_tuned(tmp_path / "bad.json")


def test_add_rms_norm_and_write_kv_references():
    x, r, w = torch.randn(3, 10), torch.randn(3, 10), torch.randn(10)
    normed, total = K.add_rms_norm(x, r, w, 1e-6)
    assert torch.equal(total, x + r) and torch.equal(normed, K.rms_norm(x + r, w, 1e-6))
    k_pages, v_pages = torch.zeros(3, 4, 2, 5), torch.zeros(3, 4, 2, 5)
    k, v = torch.randn(2, 2, 5), torch.randn(2, 2, 5)
    K.write_kv(k_pages, v_pages, k, v, torch.tensor([9, 2]))  # page 2 slot 1, page 0 slot 2
    assert torch.equal(k_pages[2, 1], k[0]) and torch.equal(v_pages[0, 2], v[1])
    assert int((k_pages != 0).any(-1).any(-1).sum()) == 2


def test_lora_delta_groups_adapters_of_different_ranks():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(7, 12, generator=g)
    y = torch.randn(7, 20, generator=g)
    adapters = [(torch.tensor([0, 4]), torch.randn(4, 12, generator=g), torch.randn(20, 4, generator=g), 0.5),
                (torch.tensor([2, 3, 6]), torch.randn(16, 12, generator=g), torch.randn(20, 16, generator=g), 2.0)]
    want = y.clone()
    for rows, a, b, s in adapters:
        for r in rows.tolist():
            want[r] += s * (b @ (a @ x[r]))
    got = K.lora_delta(y.clone(), x, adapters)
    assert torch.allclose(got, want, atol=1e-5)
    untouched = [1, 5]
    assert torch.equal(got[untouched], y[untouched])


def test_paged_attention_matches_full_attention_for_the_last_queries():
    g = torch.Generator().manual_seed(4)
    q = torch.randn(1, 8, 9, 6, generator=g)
    k = torch.randn(1, 2, 9, 6, generator=g)
    v = torch.randn(1, 2, 9, 6, generator=g)
    full = K.attention(q, k, v, 4, 0.4)  # (1, heads, seq, dim)
    tail = K.paged_attention(q[0, :, 6:].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1),
                             torch.arange(6, 9), 4, 0.4)
    assert torch.allclose(tail.transpose(0, 1), full[0, :, 6:], atol=1e-6)


@pytest.mark.parametrize("heads, kv_heads, window", [(4, 4, None), (8, 2, None), (12, 4, 5), (8, 1, 3)])
def test_decode_attention_over_pages_equals_naive_attention_and_slices_alike(heads, kv_heads, window):
    """Each sequence's query, at its own context length, against the naive formula on its gathered
    keys; slicing the batch to bound gathered memory gives the same."""
    from planc.kernels import problems, reference

    g = torch.Generator().manual_seed(7)
    lens = [1, 9, 4, 16, 7]
    q, k_pages, v_pages, tables, ctx, window, scale = problems.decode_attention(lens, heads, kv_heads, 6, 4,
                                                                                torch.float32, "cpu", g, window)
    got = reference.decode_attention(q, k_pages, v_pages, tables, ctx, window, scale)
    for i, n in enumerate(lens):
        slots = tables[i, torch.arange(n) // 4] * 4 + torch.arange(n) % 4
        k = k_pages.flatten(0, 1)[slots].transpose(0, 1)[None]  # (1, kv_heads, n, dim)
        v = v_pages.flatten(0, 1)[slots].transpose(0, 1)[None]
        qi = torch.zeros(1, heads, n, 6)
        qi[0, :, -1] = q[i]
        want = _naive_attention(qi, k, v, window, scale)[0, :, -1]
        assert torch.allclose(got[i], want, atol=1e-5), i
    one_seq_at_a_time = 2 * 16 * kv_heads * 6 * 4  # bytes of the longest sequence's gathered K and V
    sliced = reference.decode_attention(q, k_pages, v_pages, tables, ctx, window, scale, one_seq_at_a_time)
    assert torch.allclose(sliced, got, atol=1e-6)


def test_without_triton_planc_imports_and_runs_torch_and_refuses_a_forced_triton():
    import subprocess
    import sys

    probe = """
import sys
sys.modules["triton"] = None  # import triton raises ImportError, as when it is not installed
import torch, planc, planc.kernels as K, planc.passes.tune_kernels, planc.runtime.server
assert not K.triton_available()
assert K.rms_norm(torch.ones(1, 4), torch.ones(4), 1e-6).shape == (1, 4)
try:
    K.KernelSelection.parse("decode_attention=triton").check(torch.device("cpu"))
except ValueError as exc:
    print(exc)
"""
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "Triton is not installed" in run.stdout
