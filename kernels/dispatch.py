"""Which implementation each op uses. One registry object, no import-time switching."""
from __future__ import annotations

from typing import Callable

from planc.kernels import reference


class KernelRegistry:
    """Maps op name -> {implementation name -> callable} and which implementation is selected.

    >>> reg = KernelRegistry()
    >>> reg.selected("rms_norm")
    'torch'
    """

    def __init__(self) -> None:
        self._impls: dict[str, dict[str, Callable]] = {
            "rms_norm": {"torch": reference.rms_norm},
            "silu_mul": {"torch": reference.silu_mul},
            "apply_rotary": {"torch": reference.apply_rotary},
            "attention": {"torch": reference.attention},
            "paged_attention": {"torch": reference.paged_attention},
            "lora_delta": {"torch": reference.lora_delta},
            "decode_attention": {"torch": reference.decode_attention},
        }
        self._selected: dict[str, str] = {op: "torch" for op in self._impls}

    def register(self, op: str, name: str, fn: Callable) -> None:
        if op not in self._impls:
            raise KeyError(f"unknown op {op!r}; known: {sorted(self._impls)}")
        self._impls[op][name] = fn

    def select(self, op: str, name: str) -> None:
        if name not in self._impls[op]:
            raise KeyError(f"op {op!r} has no implementation {name!r}; it has {sorted(self._impls[op])}")
        self._selected[op] = name

    def selected(self, op: str) -> str:
        return self._selected[op]

    def impl(self, op: str) -> Callable:
        return self._impls[op][self._selected[op]]


default_registry = KernelRegistry()
