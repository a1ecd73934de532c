"""Every Triton kernel against its torch reference: on the CPU under TRITON_INTERPRET=1 (conftest.py
sets it where there is no GPU), on the GPU where there is one.

Inputs are fresh random tensors each run (the seed is printed in every failure message); every
tensor a kernel allocates is poisoned with NaN, and in-place targets carry NaN or known values
where nothing may be written, so an element a kernel fails to write (or writes where it must not)
shows. Tolerances: fp32 1e-5 relative to the output's scale; 16-bit dtypes are judged against the
reference run in fp32 on the same inputs: fp16 1e-2, bf16 2e-2. The bf16 bound is wider because
Triton 3.9's interpreter converts fp32 to bf16 by truncation where a GPU rounds to nearest even,
which roughly doubles the rounding error here (with round-to-nearest the kernels' bf16 error equals
the torch reference's own); fp16 conversions round correctly and match torch.
"""
from __future__ import annotations

import random

import pytest
import torch

pytest.importorskip("triton")

from planc.kernels import problems, reference  # noqa: E402
from planc.kernels import triton_attention, triton_elementwise, triton_lora, triton_norm  # noqa: E402
from planc.kernels.dispatch import interpreting  # noqa: E402

# conftest.py turns the interpreter on where there is no GPU; with a GPU the kernels run on it.
DEVICE = "cpu" if interpreting() else "cuda"
SEED = random.SystemRandom().randrange(2**31)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 1e-2}


def gen_for(*key) -> torch.Generator:
    return torch.Generator().manual_seed(hash((SEED,) + key) % 2**31)


@pytest.fixture(autouse=True)
def poisoned_allocations(monkeypatch):
    """Every float tensor allocated during a test starts as NaN (outputs and scratch alike)."""
    empty, empty_like = torch.empty, torch.empty_like

    def poison(t: torch.Tensor) -> torch.Tensor:
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(empty_like(*a, **k)))


def upcast(args):
    """The same inputs in fp32 (nested in the LoRA groups too): the oracle for 16-bit runs."""
    if isinstance(args, torch.Tensor):
        return args.float() if args.is_floating_point() else args
    if isinstance(args, (list, tuple)):
        return type(args)(upcast(a) for a in args)
    return args


def assert_close(got: torch.Tensor, want32: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    assert not got.isnan().any(), f"{what}: NaN in the output (unwritten elements?) seed={SEED}"
    err = ((got.float() - want32.float()).abs().max() / want32.float().abs().max().clamp_min(1e-6)).item()
    assert err < TOL[dtype], f"{what}: relative error {err:.2e} >= {TOL[dtype]} ({dtype}) seed={SEED}"


# ---------------------------------------------------------------------------------------- norms, SwiGLU
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, hidden, block", [(1, 96, None), (7, 100, None), (3, 333, 64), (5, 1000, 256)])
def test_rms_norm(dtype, rows, hidden, block):
    x, w, eps = problems.rms_norm(rows, hidden, dtype, DEVICE, gen_for("rms", rows, hidden))
    config = {"BLOCK": block} if block else None
    got = triton_norm.rms_norm(x.view(1, rows, hidden), w, eps, config=config)
    assert got.shape == (1, rows, hidden) and got.dtype == dtype
    assert_close(got[0], reference.rms_norm(*upcast((x, w)), eps), dtype, f"rms_norm {rows}x{hidden}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, hidden, block", [(4, 100, None), (6, 333, 128)])
def test_add_rms_norm(dtype, rows, hidden, block):
    x, r, w, eps = problems.add_rms_norm(rows, hidden, dtype, DEVICE, gen_for("add_rms", rows, hidden))
    normed, total = triton_norm.add_rms_norm(x, r, w, eps, config={"BLOCK": block} if block else None)
    want_normed, want_total = reference.add_rms_norm(*upcast((x, r, w)), eps)
    assert_close(total, want_total, dtype, "add_rms_norm sum")
    assert_close(normed, want_normed, dtype, "add_rms_norm norm")
    if dtype == torch.float32:  # the fused op must give the unfused ops' bits, or the model drifts
        assert torch.equal(total, x + r)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, dim, block", [(1, 77, None), (5, 352, 128), (3, 1000, None)])
def test_silu_mul(dtype, rows, dim, block):
    gate, up = problems.silu_mul(rows, dim, dtype, DEVICE, gen_for("silu", rows, dim))
    got = triton_elementwise.silu_mul(gate, up, config={"BLOCK": block} if block else None)
    assert_close(got, reference.silu_mul(*upcast((gate, up))), dtype, f"silu_mul {rows}x{dim}")


# ---------------------------------------------------------------------------------------- rotary, K/V write
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens, heads, kv_heads, head_dim", [(5, 4, 4, 16), (3, 8, 2, 24), (6, 16, 2, 64)])
def test_apply_rotary_on_the_executors_transposed_views(dtype, tokens, heads, kv_heads, head_dim):
    q, k, cos, sin = problems.apply_rotary(tokens, heads, kv_heads, head_dim, dtype, DEVICE,
                                           gen_for("rope", tokens, heads, head_dim))
    rq, rk = triton_elementwise.apply_rotary(q, k, cos, sin, config={"BLOCK_H": 4})
    wq, wk = reference.apply_rotary(*upcast((q, k, cos, sin)))
    assert_close(rq, wq, dtype, "rotary q")
    assert_close(rk, wk, dtype, "rotary k")


def test_apply_rotary_with_per_batch_angles():
    g = gen_for("rope3")
    q, k = torch.randn(2, 4, 5, 8, generator=g).to(DEVICE), torch.randn(2, 1, 5, 8, generator=g).to(DEVICE)
    cos, sin = reference.rope_cos_sin(torch.randint(0, 99, (2, 5), generator=g), torch.rand(4, generator=g), 1.0,
                                      torch.float32)
    cos, sin = cos.to(DEVICE), sin.to(DEVICE)
    for got, want in zip(triton_elementwise.apply_rotary(q, k, cos, sin), reference.apply_rotary(q, k, cos, sin)):
        assert_close(got, want, torch.float32, "rotary (batch, seq, dim) angles")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens, kv_heads, head_dim, page_size", [(5, 1, 24, 4), (9, 2, 64, 16), (3, 8, 16, 1)])
def test_write_kv_writes_exactly_its_slots(dtype, tokens, kv_heads, head_dim, page_size):
    k_pages, v_pages, k, v, slots = problems.write_kv(tokens, kv_heads, head_dim, page_size, dtype, DEVICE,
                                                      gen_for("kv", tokens, kv_heads))
    k_pages.fill_(float("nan"))
    v_pages.fill_(float("nan"))
    triton_elementwise.write_kv(k_pages, v_pages, k, v, slots)
    flat_k, flat_v = k_pages.view(-1, kv_heads, head_dim), v_pages.view(-1, kv_heads, head_dim)
    assert torch.equal(flat_k[slots], k) and torch.equal(flat_v[slots], v), f"seed={SEED}"
    others = torch.ones(flat_k.shape[0], dtype=torch.bool, device=DEVICE)
    others[slots] = False
    assert flat_k[others].isnan().all() and flat_v[others].isnan().all(), "wrote outside its slots"


# ---------------------------------------------------------------------------------------- decode attention
DECODE_CASES = [  # (context lengths, heads, kv_heads, head_dim, page_size, window, splits)
    ([1, 17, 40], 4, 4, 16, 4, None, 1),        # GQA 1, a one-token context
    ([33, 5, 64, 12], 8, 2, 24, 16, None, 3),   # GQA 4, head_dim not a power of two, split context
    ([50, 7], 16, 2, 32, 8, None, 2),           # GQA 8
    ([30, 9, 21], 8, 1, 16, 4, 8, 1),           # sliding window, GQA 8
    ([45, 3, 26], 4, 2, 16, 16, 10, 4),         # window with splits (some splits empty)
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lens, heads, kv_heads, head_dim, page_size, window, splits", DECODE_CASES)
def test_decode_attention(dtype, lens, heads, kv_heads, head_dim, page_size, window, splits):
    args = problems.decode_attention(lens, heads, kv_heads, head_dim, page_size, dtype, DEVICE,
                                     gen_for("decode", tuple(lens), heads), window=window)
    got = triton_attention.decode_attention(*args, config={"BLOCK_N": 16, "num_splits": splits})
    assert got.shape == args[0].shape and got.dtype == dtype
    assert_close(got, reference.decode_attention(*upcast(args)), dtype,
                 f"decode_attention lens={lens} gqa={heads // kv_heads} window={window} splits={splits}")


def test_decode_attention_ignores_pages_of_other_sequences():
    """Poison every page a sequence does not own: its output must not change."""
    args = list(problems.decode_attention([20, 6], 8, 2, 16, 4, torch.float32, DEVICE, gen_for("own")))
    want = reference.decode_attention(*args)
    owned = torch.zeros(args[1].shape[0], dtype=torch.bool, device=DEVICE)
    for tables, n in zip(args[3], args[4].tolist()):
        owned[tables[: (n + 3) // 4]] = True
    for pool in args[1:3]:
        pool[~owned] = float("nan")
    assert_close(triton_attention.decode_attention(*args, config={"BLOCK_N": 16, "num_splits": 2}), want,
                 torch.float32, "decode with foreign pages poisoned")


# ---------------------------------------------------------------------------------------- LoRA (SGMV)
LORA_CASES = [  # (rows per adapter, ranks, in, out)
    ([3, 2, 4], [4, 8, 16], 40, 50),
    ([20, 1, 5], [16, 4, 8], 96, 200),          # an adapter spanning two row blocks
    ([1], [8], 64, 64),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, ranks, in_dim, out_dim", LORA_CASES)
def test_lora_delta_mixed_ranks_in_one_batch(dtype, rows, ranks, in_dim, out_dim):
    y, x, groups = problems.lora_delta(rows, ranks, in_dim, out_dim, dtype, DEVICE, gen_for("lora", tuple(rows)))
    y = torch.cat([y, torch.full((2, out_dim), 7.0, dtype=dtype, device=DEVICE)])  # rows no adapter uses
    x = torch.cat([x, torch.randn(2, in_dim, generator=gen_for("lx")).to(DEVICE, dtype)])
    want = reference.lora_delta(*upcast((y.clone(), x, groups)))
    got = triton_lora.lora_delta(y.clone(), x, groups, config={"BLOCK_M": 16, "BLOCK_K": 32, "BLOCK_N": 32})
    assert_close(got, want, dtype, f"lora_delta ranks={ranks}")
    assert (got[-2:] == 7.0).all(), "rows of no adapter were written"


def test_lora_delta_rejects_mismatched_shapes():
    y, x, groups = problems.lora_delta([2], [4], 16, 24, torch.float32, DEVICE, gen_for("bad"))
    rows, a, b, s = groups[0]
    with pytest.raises(ValueError, match="do not fit"):
        triton_lora.lora_delta(y, x, [(rows, a, b.t().contiguous(), s)])


# ---------------------------------------------------------------------------------------- end to end
def _greedy(engine, requests: list[tuple[str, list[int]]], max_tokens: int) -> list[list[int]]:
    from planc.runtime.sampling import SamplingParams

    outputs: list[list[int]] = [[] for _ in requests]
    for i, (variant, prompt) in enumerate(requests):
        engine.submit(variant, prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True),
                      lambda e, i=i: e.token_id is not None and outputs[i].append(e.token_id))
    while engine.has_work():
        engine.step()
    return outputs


def test_served_tiny_model_with_triton_forced_gives_the_torch_tokens(tiny_bundle):
    """Mixed batches of a partial fine-tune, a LoRA variant and the base: prefill, then batched decode."""
    import planc
    from planc.kernels import KernelRegistry, KernelSelection
    from planc.kernels.dispatch import Impl
    from planc.runtime.engine import Engine, EngineConfig

    if not interpreting():
        pytest.skip("the runtime runs on the CPU, where Triton kernels need TRITON_INTERPRET=1")
    bundle = planc.Bundle.open(tiny_bundle)
    requests = [("base", [1, 40, 41, 42]), ("chat", [1, 50, 51]), ("legal", [1, 60, 61, 62, 63]), ("chat", [1, 7])]
    want = _greedy(Engine(bundle, EngineConfig(), kernels=KernelSelection.parse("torch")), requests, 4)

    calls: dict[str, int] = {}
    registry = KernelRegistry.builtin()
    for op in ("rms_norm", "add_rms_norm", "silu_mul", "apply_rotary", "write_kv", "decode_attention", "lora_delta"):
        fn = registry.get(op, "triton").resolve()
        registry.register(op, "triton", Impl(lambda *a, op=op, fn=fn, **k: calls.update({op: calls.get(op, 0) + 1})
                                             or fn(*a, **k), tunable=True))
    engine = Engine(bundle, EngineConfig(), kernels=KernelSelection.parse("triton", registry=registry))
    assert _greedy(engine, requests, 4) == want, f"seed={SEED}"
    assert sorted(calls) == sorted(["rms_norm", "add_rms_norm", "silu_mul", "apply_rotary", "write_kv",
                                    "decode_attention", "lora_delta"])


def test_forcing_triton_without_a_device_is_refused_at_start(tiny_bundle, monkeypatch):
    import planc
    from planc.errors import PlancError
    from planc.kernels import KernelSelection
    from planc.runtime.engine import Engine

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(PlancError, match="need a CUDA device"):
        Engine(planc.Bundle.open(tiny_bundle), kernels=KernelSelection.parse("decode_attention=triton"))
