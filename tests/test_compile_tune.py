"""compile --tune-kernels: kernels.json in the bundle, verified on load; a GPU target needs its GPU."""
from __future__ import annotations

import json

import pytest

from planc.bundle import Bundle
from planc.cli import main
from planc.errors import BundleError

CPU_CLUSTER = ("nodes: 1\ndevices_per_node: 1\n"
               "device: {name: cpu, kind: cpu, memory_gb: 8, peak_tflops: {fp32: 0.05}, mem_bw_gbps: 10}\n")


def test_tuned_configs_are_written_verified_and_read_by_the_server(tiny_example, tmp_path, capsys):
    from planc.runtime.server import ServeOptions, kernel_selection

    cluster = tmp_path / "cpu.yaml"
    cluster.write_text(CPU_CLUSTER)
    out = tmp_path / "bundle"
    assert main(["compile", str(tiny_example), "-o", str(out), "--cluster", str(cluster), "--tune-kernels"]) == 0
    b = Bundle.open(out)
    table = json.loads((out / "kernels.json").read_text())
    assert table["rms_norm"]["*"] == {"impl": "torch"} and b.manifest["kernels"]["file"] == "kernels.json"
    assert "tune_kernels" in b.manifest["settings"]["passes"] and b.plan is not None
    assert kernel_selection(b, ServeOptions(None, None, None, None, 1)) is not None
    (out / "kernels.json").write_text(json.dumps({**table, "silu_mul": {"*": {"impl": "triton"}}}))
    with pytest.raises(BundleError, match="kernels.json"):
        Bundle.open(out)


def test_gpu_target_without_a_gpu_is_one_line_and_writes_nothing(tiny_example, tmp_path, capsys):
    out = tmp_path / "bundle"
    assert main(["compile", str(tiny_example), "-o", str(out), "--cluster", "H100-80GB", "--tune-kernels"]) == 1
    err = capsys.readouterr().err
    assert "no CUDA device is present" in err and err.count("\n") == 1
    assert not out.exists()


def test_bundle_report_shows_sharing_and_the_plan_and_is_verified(tiny_example, tmp_path):
    out = tmp_path / "bundle"
    assert main(["compile", str(tiny_example), "-o", str(out), "--cluster", "2xH100-80GB"]) == 0
    text = (out / "report.html").read_text()
    b = Bundle.open(out)
    assert text.count("<svg") == 2 and "Plan on 2xH100-80GB" in text
    assert all(f">{name}<" in text for name in b.variants)
    (out / "report.html").write_text(text.replace("Sharing", "Shared"))
    with pytest.raises(BundleError, match="report.html"):
        Bundle.open(out)
