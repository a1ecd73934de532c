"""Golden tests of the tune_kernels pass: the torch path for a CPU target; for a GPU target (timed
here under TRITON_INTERPRET=1, or on a GPU when there is one, with a scripted timer) the shape
classes this model serves and the fastest checked candidate of each."""
from __future__ import annotations

import itertools

import pytest
import torch

import planc
from planc.errors import PassError
from planc.example.checkpoints import hf_config, random_state, write_adapter
from planc.kernels import autotune, problems
from planc.kernels.dispatch import Impl, KernelRegistry, interpreting
from planc.passes.tune_kernels import TUNED_OPS, TuneKernelsPass
from tests.helpers import write_project

DEVICE = "cpu" if interpreting() else "cuda"  # conftest.py turns the interpreter on where there is no GPU


@pytest.fixture(scope="module")
def project(tmp_path_factory, tokenizer_dir):
    """A 3-layer llama (hidden 64, 4 heads over 2 kv heads, head_dim 16) and LoRA adapters of ranks 4 and 16."""
    root = tmp_path_factory.mktemp("tune")
    cfg = hf_config("llama")
    write_adapter(root / "lora4", cfg, targets=("q_proj", "down_proj"), rank=4, seed=1)
    write_adapter(root / "lora16", cfg, targets=("q_proj",), rank=16, seed=2)
    return write_project(root, tokenizer_dir, {"base": random_state(cfg)},
                         adapters={"lora4": "./lora4", "lora16": "./lora16"})


def _compile(project, tune: TuneKernelsPass):
    return planc.compile(planc.load(project), passes=planc.default_pipeline() + [tune])


def test_cpu_target_records_the_torch_path(project):
    program = _compile(project, TuneKernelsPass(target="cpu"))
    assert program.extras["kernel_configs"] == {op: {"*": {"impl": "torch"}} for op in TUNED_OPS}


def test_gpu_target_without_a_gpu_is_refused(project):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present here")
    with pytest.raises(PassError, match="no CUDA device is present"):
        _compile(project, TuneKernelsPass(target="gpu"))


def test_gpu_target_tunes_each_shape_class(project):
    pytest.importorskip("triton")
    clock = itertools.count(1000, -1)  # every timing faster than the one before: the last candidate wins
    two = {  # two candidates per op keep the interpreter quick
        "rms_norm": [{"BLOCK": 32, "num_warps": 1}, {"BLOCK": 64, "num_warps": 2}],
        "add_rms_norm": [{"BLOCK": 64, "num_warps": 2}, {"BLOCK": 32, "num_warps": 1}],
        "silu_mul": [{"BLOCK": 64, "num_warps": 1}, {"BLOCK": 128, "num_warps": 1}],
        "apply_rotary": [{"BLOCK_H": 4, "num_warps": 1}, {"BLOCK_H": 2, "num_warps": 1}],
        "write_kv": [{"num_warps": 1}, {"num_warps": 2}],
        "decode_attention": [{"BLOCK_N": 16, "num_splits": 1, "num_warps": 4}, {"BLOCK_N": 16, "num_splits": 2,
                                                                                "num_warps": 4}],
        "lora_delta": [{"BLOCK_M": 16, "BLOCK_K": 32, "BLOCK_N": 32, "num_warps": 4},
                       {"BLOCK_M": 16, "BLOCK_K": 64, "BLOCK_N": 64, "num_warps": 4}],
    }
    tune = TuneKernelsPass(target="gpu", device=DEVICE, timer=lambda fn: (fn(), next(clock))[1],
                           batch_sizes=[2], context_lens=[32], candidates=two)
    table = _compile(project, tune).extras["kernel_configs"]
    assert table == {
        "rms_norm": {"fp32,hidden=64": {"impl": "triton", "BLOCK": 64, "num_warps": 2}},
        "add_rms_norm": {"fp32,hidden=64": {"impl": "triton", "BLOCK": 32, "num_warps": 1}},
        "silu_mul": {"fp32,dim=160": {"impl": "triton", "BLOCK": 128, "num_warps": 1}},
        "apply_rotary": {"fp32,head_dim=16,heads=4/2": {"impl": "triton", "BLOCK_H": 2, "num_warps": 1}},
        "write_kv": {"fp32,kv=2x16": {"impl": "triton", "num_warps": 2}},
        "decode_attention": {"fp32,head_dim=16,groups=2,batch<=2,ctx<=32":
                             {"impl": "triton", "BLOCK_N": 16, "num_splits": 2, "num_warps": 4}},
        "lora_delta": {  # q_proj carries ranks 4 and 16 in one batch; down_proj only rank 4
            "fp32,in=64,out=64,rank<=16,rows<=2": {"impl": "triton", **two["lora_delta"][1]},
            "fp32,in=160,out=64,rank<=4,rows<=2": {"impl": "triton", **two["lora_delta"][1]},
        },
    }
    assert all(not r.rejected for r in tune.results)
    assert planc.kernels.tuned.validate_tuned(table) == table  # what the server will load


def test_torch_wins_ties_and_wrong_candidates_are_dropped():
    pytest.importorskip("triton")
    args = problems.silu_mul(3, 40, torch.float32, DEVICE, torch.Generator().manual_seed(0))
    result = autotune.tune("silu_mul", args, timer=lambda fn: 1.0, candidates=[{"BLOCK": 64}])
    assert result.best == {"impl": "torch"} and len(result.timings) == 2
    reg = KernelRegistry.builtin()
    reg.register("silu_mul", "triton", Impl(lambda g, u, config: g * u, tunable=True))  # not silu
    result = autotune.tune("silu_mul", args, timer=lambda fn: 1.0, registry=reg, candidates=[{"BLOCK": 64}])
    assert result.rejected == [({"BLOCK": 64}, "disagrees with the torch reference")]
    assert [c for c, _ in result.timings] == [{"impl": "torch"}]
