"""Backends turn a compiled Program into a bundle for one target. They never re-plan or re-trace.

A backend is any object with a `name` and ``emit(program, root, ctx) -> dict`` that writes its
target-specific files (entry points, launch files) into the staging directory `root` and returns
them as {role: relative path}. Register your own without editing planc:

>>> from planc.backends import register_backend, get_backend
>>> class Echo:
...     name = "echo"
...     def emit(self, program, root, ctx):
...         return {}
>>> echo = register_backend(Echo())
>>> get_backend("echo").name
'echo'
"""
from __future__ import annotations

from typing import Any, Protocol

from planc.errors import PlancError


class Backend(Protocol):
    name: str

    def emit(self, program: Any, root: Any, ctx: Any) -> dict[str, str]: ...


_BACKENDS: dict[str, Backend] = {}


def register_backend(backend: Backend, replace: bool = False) -> Backend:
    """Make `backend` available by its name; replacing an existing one must be asked for."""
    if backend.name in _BACKENDS and not replace and _BACKENDS[backend.name] is not backend:
        raise PlancError(f"a backend named {backend.name!r} is already registered (pass replace=True to replace it)")
    _BACKENDS[backend.name] = backend
    return backend


def get_backend(name: str) -> Backend:
    if name not in _BACKENDS:
        raise PlancError(f"unknown backend {name!r} (available: {', '.join(sorted(_BACKENDS))})")
    return _BACKENDS[name]


def available_backends() -> list[str]:
    return sorted(_BACKENDS)


from planc.backends.local import LocalBackend  # noqa: E402  (registers the built-in backends)
from planc.backends.ray import RayBackend  # noqa: E402  (imports no ray: compiling for Ray does not need it)

register_backend(LocalBackend())
register_backend(RayBackend())
