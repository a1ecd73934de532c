"""Every Triton kernel compiles for a real GPU target (sm_90, to a cubin with Triton's ptxas) on this
CPU-only machine, and `benchmarks/kernels.py` runs end to end under the interpreter.

The interpreter accepts code the GPU compiler refuses, so compiling is checked separately. It runs in
a subprocess without TRITON_INTERPRET: conftest.py sets it for this process, and a kernel is bound
to the interpreter when it is decorated."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("triton")

REPO = Path(__file__).resolve().parents[1]
KERNELS = ("_rms_norm_kernel", "_silu_mul_kernel", "_rotary_kernel", "_write_kv_kernel", "_decode_partial_kernel",
           "_decode_combine_kernel", "_shrink_kernel", "_expand_kernel")


def _python(args: list[str], interpret: bool, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env=env)


def test_every_kernel_compiles_for_sm90_in_each_dtype():
    run = _python(["-m", "planc.kernels.aot", "--arch", "90"], interpret=False)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    lines = run.stdout.splitlines()
    assert "0 failed" in lines[-1]
    for kernel in KERNELS:
        dtypes = {d for line in lines if line.startswith(kernel + " ") for d in line.split()[1].split("+")}
        assert dtypes == {"fp32", "bf16", "fp16"}, (kernel, dtypes)


def test_a_launch_the_device_cannot_take_is_reported_not_launched():
    probe = textwrap.dedent("""
        import json, torch
        from planc.kernels import aot, problems
        gen = torch.Generator().manual_seed(0)
        with aot.compiling(90) as compiler:
            from planc.kernels import triton_attention, triton_norm
            args = problems.decode_attention([300, 20], 8, 2, 128, 16, torch.bfloat16, "cpu", gen)
            triton_attention.decode_attention(*args, config={"BLOCK_N": 1024, "num_splits": 1, "num_stages": 4})
            x, w, eps = problems.rms_norm(2, 100, torch.float32, "cpu", gen)
            triton_norm.rms_norm(x, w, eps, config={"BLOCK": 100})     # not a power of two
            triton_norm.rms_norm(x, w, eps, config={"BLOCK": 128})     # fine
        print(json.dumps([[l.kernel, l.constexprs.get("BLOCK"), l.shared, l.error]
                          for l in compiler.launches.values()]))
    """)
    run = _python(["-c", probe], interpret=False)
    assert run.returncode == 0, run.stderr[-3000:]
    launches = json.loads(run.stdout.splitlines()[-1])
    decode, bad_norm, good_norm = launches
    assert decode[0] == "_decode_partial_kernel" and "shared memory" in decode[3] and decode[2] > 227 * 1024
    assert bad_norm[:2] == ["_rms_norm_kernel", 100] and bad_norm[3]
    assert good_norm[:2] == ["_rms_norm_kernel", 128] and good_norm[3] is None


def test_aot_refuses_an_interpreted_process():
    run = _python(["-m", "planc.kernels.aot"], interpret=True)
    assert run.returncode == 1 and "TRITON_INTERPRET unset" in run.stderr and "Traceback" not in run.stderr


def test_kernel_benchmark_dry_run_tunes_checks_and_reports(tmp_path):
    out = tmp_path / "kernels.json"
    run = _python(["benchmarks/kernels.py", "--dry-run", "--tune", "--out", str(out)], interpret=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads(out.read_text())
    ops = {row["op"] for row in report["rows"]}
    assert ops == {"rms_norm", "add_rms_norm", "silu_mul", "apply_rotary", "write_kv", "decode_attention",
                   "lora_delta"}
    assert all(row["status"] == "ok" and row["rel_error"] < 2e-2 for row in report["rows"])
    assert {s["op"] for s in report["tune_summary"]} == ops
    tuned = json.loads((tmp_path / "kernels_tuned.json").read_text())
    assert set(tuned) == ops and all(cfg for classes in tuned.values() for cfg in classes.values())
