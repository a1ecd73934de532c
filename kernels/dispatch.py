"""Which implementation each op runs: a registry of implementations and a selection over it.

The registry says what exists (``torch`` references always; ``triton`` kernels imported lazily,
so ``import planc.kernels`` never imports Triton). A :class:`KernelSelection` says what to use:
per op ``auto`` (Triton on CUDA tensors when Triton is installed, torch otherwise), ``torch`` or
``triton``, plus tuned launch configs per shape class. The runtime passes its selection to the
engine, which makes it current for each step with :func:`use_kernels`; code outside any
``use_kernels`` block gets the selection named by the ``PLANC_KERNELS`` environment variable.

>>> sel = KernelSelection.parse("triton,rms_norm=torch")
>>> sel.choice("rms_norm"), sel.choice("silu_mul")
('torch', 'triton')
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import os
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Iterator, Mapping, Optional

import torch

from planc.kernels import reference, shapes

OPS = ("rms_norm", "add_rms_norm", "silu_mul", "apply_rotary", "attention", "paged_attention",
       "decode_attention", "write_kv", "lora_delta")
CHOICES = ("auto", "torch", "triton")
ENV_VAR = "PLANC_KERNELS"

# op -> "module:function" of its Triton host wrapper, imported on first use.
_TRITON_IMPLS = {
    "rms_norm": "planc.kernels.triton_norm:rms_norm",
    "add_rms_norm": "planc.kernels.triton_norm:add_rms_norm",
    "silu_mul": "planc.kernels.triton_elementwise:silu_mul",
    "apply_rotary": "planc.kernels.triton_elementwise:apply_rotary",
    "write_kv": "planc.kernels.triton_elementwise:write_kv",
    "decode_attention": "planc.kernels.triton_attention:decode_attention",
    "lora_delta": "planc.kernels.triton_lora:lora_delta",
}


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """Whether Triton imports. Asked only where a Triton kernel could run (CUDA tensors, a forced
    choice, tuning), never by ``import planc``; a broken install counts as absent."""
    try:
        import triton  # noqa: F401
    except Exception:  # noqa: BLE001  (ImportError, or a Triton whose native parts fail to load)
        return False
    return True


def interpreting() -> bool:
    """Whether Triton runs in its CPU interpreter (must be set before Triton kernels are imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@dataclass(frozen=True)
class Impl:
    """One implementation of an op. `tunable` ones take a ``config=`` launch config."""

    fn: Optional[Callable] = None
    path: Optional[str] = None
    """``module:function`` imported on first use (keeps Triton out of ``import planc``)."""
    tunable: bool = False

    def resolve(self) -> Callable:
        if self.fn is not None:
            return self.fn
        module, name = self.path.split(":")
        return _import_attr(module, name)


@functools.lru_cache(maxsize=None)
def _import_attr(module: str, name: str) -> Callable:
    return getattr(importlib.import_module(module), name)


class KernelRegistry:
    """op -> {implementation name -> Impl}. Extensions register more implementations on their own instance.

    >>> reg = KernelRegistry.builtin()
    >>> sorted(reg.names("rms_norm"))
    ['torch', 'triton']
    """

    def __init__(self) -> None:
        self._impls: dict[str, dict[str, Impl]] = {op: {"torch": Impl(getattr(reference, op))} for op in OPS}

    @classmethod
    def builtin(cls) -> "KernelRegistry":
        reg = cls()
        for op, path in _TRITON_IMPLS.items():
            reg.register(op, "triton", Impl(path=path, tunable=True))
        return reg

    def register(self, op: str, name: str, impl: Impl | Callable) -> None:
        if op not in self._impls:
            raise KeyError(f"unknown op {op!r}; known: {sorted(self._impls)}")
        self._impls[op][name] = impl if isinstance(impl, Impl) else Impl(impl)

    def names(self, op: str) -> list[str]:
        return list(self._impls[op])

    def get(self, op: str, name: str) -> Impl:
        if name not in self._impls[op]:
            raise KeyError(f"op {op!r} has no implementation {name!r}; it has {sorted(self._impls[op])}")
        return self._impls[op][name]


@dataclass(frozen=True)
class KernelSelection:
    """What each op runs: a choice per op and tuned configs (op -> shape class -> config).

    A tuned config may carry ``"impl"`` (what won the timing for that shape class); an explicit
    choice other than ``auto`` overrides it, so ``--kernels torch`` always means torch.
    """

    registry: KernelRegistry = field(default_factory=KernelRegistry.builtin)
    choices: Mapping[str, str] = field(default_factory=dict)
    tuned: Mapping[str, Mapping[str, dict]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for op, name in self.choices.items():
            if op not in OPS:
                raise ValueError(f"unknown kernel op {op!r}; known: {', '.join(OPS)}")
            if name != "auto" and name not in self.registry.names(op):
                raise ValueError(f"kernel op {op} has no implementation {name!r}; "
                                 f"it has {', '.join(['auto'] + self.registry.names(op))}")
        object.__setattr__(self, "choices", MappingProxyType(dict(self.choices)))

    @classmethod
    def parse(cls, text: str, tuned: Optional[Mapping[str, Mapping[str, dict]]] = None,
              registry: Optional[KernelRegistry] = None) -> "KernelSelection":
        """``"triton"``, ``"torch"``, ``"auto"``, or comma-separated ``op=impl`` pairs, optionally after a
        default: ``"triton,rms_norm=torch"``. A bare default applies to the ops that have that
        implementation (prefill attention has no Triton kernel and stays on torch). Empty means auto."""
        registry = registry or KernelRegistry.builtin()
        choices: dict[str, str] = {}
        for part in filter(None, (p.strip() for p in (text or "").split(","))):
            op, sep, name = (s.strip() for s in part.partition("="))
            if sep:
                choices[op] = name
                continue
            matching = [o for o in OPS if op == "auto" or op in registry.names(o)]
            if not matching:
                raise ValueError(f"kernel choice {op!r} is not one of {', '.join(CHOICES)}")
            choices.update({o: op for o in matching})
        return cls(registry, choices, tuned or {})  # __post_init__ checks the op=impl pairs

    @classmethod
    def from_env(cls, tuned: Optional[Mapping[str, Mapping[str, dict]]] = None) -> "KernelSelection":
        return cls.parse(os.environ.get(ENV_VAR, ""), tuned)

    def check(self, device: torch.device) -> None:
        """Raise ValueError when an op forced to Triton cannot run on `device` here (fail at start, not per call)."""
        forced = sorted(op for op, name in self.choices.items() if name == "triton")
        if not forced:
            return
        if not triton_available():
            raise ValueError(f"Triton is not installed (pip install 'planc[triton]'); forced for {', '.join(forced)}")
        if device.type != "cuda" and not interpreting():
            raise ValueError(f"Triton kernels need a CUDA device, and this runtime runs on {device} "
                             f"(TRITON_INTERPRET=1 runs them on the CPU, slowly, for debugging)")

    def choice(self, op: str) -> str:
        return self.choices.get(op, "auto")

    def call(self, op: str, *args: Any) -> Any:
        config = None
        table = self.tuned.get(op)
        if table:
            config = table.get(shapes.shape_class(op, *args)) or table.get("*")
        name = self.choice(op)
        if name == "auto":
            name = (config or {}).get("impl") or _auto(op, args[0], self.registry)
        impl = self.registry.get(op, name)
        fn = impl.resolve()
        return fn(*args, config=config) if impl.tunable else fn(*args)


def _auto(op: str, first: torch.Tensor, registry: KernelRegistry) -> str:
    if first.is_cuda and triton_available() and "triton" in registry.names(op):
        return "triton"
    return "torch"


_current: contextvars.ContextVar[Optional[KernelSelection]] = contextvars.ContextVar("planc_kernels", default=None)


@contextlib.contextmanager
def use_kernels(selection: KernelSelection) -> Iterator[KernelSelection]:
    """Make `selection` current in this thread/context for the duration of the block.

    >>> import torch, planc.kernels as K
    >>> with use_kernels(KernelSelection.parse("torch")):
    ...     K.silu_mul(torch.zeros(2), torch.ones(2)).tolist()
    [0.0, 0.0]
    """
    token = _current.set(selection)
    try:
        yield selection
    finally:
        _current.reset(token)


def current() -> KernelSelection:
    """The selection in force: the innermost `use_kernels`, else the one PLANC_KERNELS names."""
    sel = _current.get()
    return sel if sel is not None else _env_selection(os.environ.get(ENV_VAR, ""))


@functools.lru_cache(maxsize=8)
def _env_selection(text: str) -> KernelSelection:
    # Cached per value of the variable: parsing on every op call would cost more than the op.
    return KernelSelection.parse(text)
