"""Tuned kernel configs: op -> shape class -> launch config, as the tuning pass writes them.

The table is plain JSON (a bundle's ``kernels.json``) so the server reads it at start without
re-tuning. A config holds the winner's ``impl`` (``triton`` or ``torch``) and, for Triton, its
block sizes, ``num_warps`` and ``num_stages``; the kernel wrappers read the keys they know.

>>> table = validate_tuned({"rms_norm": {"bf16,hidden=4096": {"impl": "triton", "BLOCK": 4096, "num_warps": 8}}})
>>> KernelSelection.parse("", table).tuned["rms_norm"]["bf16,hidden=4096"]["BLOCK"]
4096
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from planc.errors import BundleError
from planc.jsonfile import read_json_object
from planc.kernels.dispatch import OPS, KernelSelection  # noqa: F401  (KernelSelection: doctest)

Table = dict[str, dict[str, dict[str, Any]]]


def validate_tuned(table: Any, source: str = "kernel configs") -> Table:
    """Check the table's shape; a bad file must fail at server start, not at the first request."""
    if not isinstance(table, dict):
        raise BundleError(f"{source}: expected an object of op -> shape class -> config")
    for op, classes in table.items():
        if op not in OPS:
            raise BundleError(f"{source}: unknown kernel op {op!r} (known: {', '.join(OPS)})")
        if not isinstance(classes, dict):
            raise BundleError(f"{source}: {op}: expected an object of shape class -> config")
        for cls, config in classes.items():
            if not isinstance(config, dict):
                raise BundleError(f"{source}: {op}[{cls!r}]: expected a config object")
            impl = config.get("impl", "triton")
            if impl not in ("torch", "triton"):
                raise BundleError(f"{source}: {op}[{cls!r}]: impl {impl!r} is not torch or triton")
            bad = [k for k, v in config.items() if k != "impl" and not (isinstance(v, int) and v > 0)]
            if bad:
                raise BundleError(f"{source}: {op}[{cls!r}]: {', '.join(bad)} must be positive integers")
    return table


def load_tuned(path: str | Path) -> Table:
    """Read and check a ``kernels.json``; pass the result as ``KernelSelection(tuned=...)``."""
    path = Path(path)
    return validate_tuned(read_json_object(path, BundleError), str(path))
