"""A normal (non-editable) install maps passes/, backends/, kernels/, templates/ into planc's namespace."""
from __future__ import annotations

import subprocess
import sys
import zipfile

import pytest


@pytest.mark.slow
def test_wheel_contains_the_mapped_packages_and_templates(tmp_path):
    root = __import__("pathlib").Path(__file__).resolve().parent.parent
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(root)],
                           capture_output=True, text=True, timeout=300)
    if build.returncode != 0:
        pytest.fail(build.stderr[-2000:])
    wheel = next(tmp_path.glob("planc-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for expected in ("planc/passes/trace.py", "planc/backends/local.py", "planc/kernels/reference.py",
                     "planc/templates/local/run.py.j2", "planc/example/tiny.py", "planc/cli.py"):
        assert expected in names, expected
    assert not any(n.startswith(("passes/", "backends/", "kernels/", "templates/", "tests/")) for n in names)
    # Install it into a fresh target dir and import from there (no editable finder involved).
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, timeout=300)
    probe = ("import sys; sys.path.insert(0, sys.argv[1]); import planc, planc.passes, planc.backends, "
             "planc.kernels; from planc.templating import render; assert planc.__file__.startswith(sys.argv[1]); "
             "print(render('local/run.py.j2', variants=['a'], default_variant='a')[:20])")
    run = subprocess.run([sys.executable, "-c", probe, str(target)], capture_output=True, text=True, timeout=120,
                         cwd=str(tmp_path))
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("#!/usr/bin/env pytho")


def test_editable_install_imports_the_namespace():
    import planc.backends
    import planc.kernels
    import planc.passes
    from planc.templating import render

    assert planc.passes.TracePass.name == "trace"
    assert "planc" in render("local/run.py.j2", variants=["a"], default_variant="a")
