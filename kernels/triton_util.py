"""Helpers of the Triton host wrappers. Imports Triton: only the triton_* modules import this.

The interpreter (``TRITON_INTERPRET=1``) is chosen when a kernel is decorated, so it must be set
before the first Triton kernel module is imported; tests set it at the top of their module.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton

from planc.kernels.dispatch import interpreting

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_tensors(op: str, *tensors: torch.Tensor, dtypes: tuple = _DTYPES) -> torch.device:
    """One device for all; CUDA unless interpreting; float dtypes the kernels were written for."""
    device = tensors[0].device
    for t in tensors:
        if t.device != device:
            raise ValueError(f"{op}: tensors on different devices ({device} and {t.device})")
        if t.is_floating_point() and t.dtype not in dtypes:
            raise ValueError(f"{op}: dtype {t.dtype} not supported by the Triton kernel ({dtypes})")
    if device.type != "cuda" and not interpreting():
        raise ValueError(f"{op}: Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors), "
                         f"got {device}; select the torch implementation instead")
    return device


def pow2(n: int, least: int = 1) -> int:
    return max(least, triton.next_power_of_2(int(n)))


def launch_options(config: Optional[dict], **defaults: int) -> dict:
    """num_warps/num_stages for the launch: the tuned config's, else the wrapper's defaults."""
    config = config or {}
    return {k: int(config.get(k, v)) for k, v in defaults.items()}


def dot_options(dtype: torch.dtype) -> dict:
    """Constexprs every tl.dot user takes.

    fp32 inputs use IEEE products: TF32 would cost ~1e-3 relative error, far above what an fp32
    model tolerates. Triton 3.9's interpreter returns garbage for bf16 tl.dot, so there the inputs
    are upcast to fp32 first (GPU runs keep native bf16 dots).
    """
    return {"DOT_PRECISION": "ieee" if dtype == torch.float32 else "tf32",
            "DOT_UPCAST": interpreting() and dtype == torch.bfloat16}
