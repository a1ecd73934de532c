"""Passes and the manager that orders, times and checks them.

A pass states its contract: what artifacts of the Program it `requires`, what it `provides`, and
optionally pass names it must run `after` or `before`. The manager orders the list by those
constraints (keeping the given order where they leave a choice), checks `requires` before and
`provides` after each pass, and wraps any failure in a PassError naming the pass and the passes
that ran before it.

>>> class CountBlocks(Pass):
...     name = "count_blocks"
...     requires = ("zoo",)
...     provides = ("num_unique_blocks",)
...     def run(self, program, ctx):
...         program.extras["num_unique_blocks"] = len(program.zoo)
...         return False
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable, Optional, Protocol, Sequence

from planc.errors import PassError, PlancError
from planc.program import PassRecord, Program


@dataclass
class PassContext:
    """Options and instruments for one compile, passed to every pass (no globals).

    `options` holds per-pass settings by pass name; `instruments` get before/after callbacks
    (progress bars, dumps, timers).
    """

    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    instruments: list["Instrument"] = field(default_factory=list)

    def options_for(self, pass_name: str) -> dict[str, Any]:
        return self.options.get(pass_name, {})


class Instrument(Protocol):
    def before_pass(self, p: "Pass", program: Program) -> None: ...
    def after_pass(self, p: "Pass", program: Program, record: PassRecord) -> None: ...


class Pass:
    """Base class of a pass. Subclasses set `name`, `requires`, `provides` and implement `run`."""

    name: ClassVar[str] = ""
    requires: ClassVar[tuple[str, ...]] = ()
    provides: ClassVar[tuple[str, ...]] = ()
    after: tuple[str, ...] = ()
    before: tuple[str, ...] = ()

    def run(self, program: Program, ctx: PassContext) -> bool:
        """Read and annotate `program`; return whether anything was changed."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<pass {self.name}>"


class FunctionPass(Pass):
    """A pass made from a plain function; see :func:`function_pass`."""

    def __init__(self, fn: Callable[[Program, PassContext], Optional[bool]], name: str,
                 requires: Sequence[str], provides: Sequence[str], after: Sequence[str], before: Sequence[str]):
        self.fn, self.name = fn, name  # type: ignore[misc]
        self.requires, self.provides = tuple(requires), tuple(provides)  # type: ignore[misc]
        self.after, self.before = tuple(after), tuple(before)

    def run(self, program: Program, ctx: PassContext) -> bool:
        return bool(self.fn(program, ctx))


def function_pass(name: Optional[str] = None, *, requires: Sequence[str] = (), provides: Sequence[str] = (),
                  after: Sequence[str] = (), before: Sequence[str] = ()) -> Callable[[Callable], FunctionPass]:
    """Turn ``fn(program, ctx)`` into a pass.

    >>> @function_pass(requires=("chains",), provides=("variant_count",))
    ... def variant_count(program, ctx):
    ...     program.extras["variant_count"] = len(program.chains)
    >>> variant_count.name
    'variant_count'
    """
    def wrap(fn: Callable) -> FunctionPass:
        return FunctionPass(fn, name or fn.__name__, requires, provides, after, before)
    return wrap


def order_passes(passes: Iterable[Pass], available: Iterable[str] = ()) -> list[Pass]:
    """Order passes by their constraints, keeping the given order where they leave a choice."""
    passes = list(passes)
    names = [p.name for p in passes]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise PassError(f"pipeline has more than one pass named {', '.join(dupes)}")
    if any(not p.name for p in passes):
        raise PassError(f"pass {passes[[p.name for p in passes].index('')]!r} has no name")
    position = {p.name: i for i, p in enumerate(passes)}
    providers: dict[str, list[str]] = {}
    for p in passes:
        for artifact in p.provides:
            providers.setdefault(artifact, []).append(p.name)
    have = set(available)
    import networkx as nx  # only when a pipeline is ordered: servers never pay for it

    graph = nx.DiGraph()
    graph.add_nodes_from(names)
    for p in passes:
        for artifact in p.requires:
            if artifact in have and artifact not in providers:
                continue
            if artifact not in providers:
                raise PassError(f"pass '{p.name}' requires '{artifact}', which no pass in the pipeline provides")
            graph.add_edges_from((src, p.name) for src in providers[artifact] if src != p.name)
        for other in p.after:
            if other not in position:
                raise PassError(f"pass '{p.name}' must run after '{other}', which is not in the pipeline")
            graph.add_edge(other, p.name)
        for other in p.before:
            if other not in position:
                raise PassError(f"pass '{p.name}' must run before '{other}', which is not in the pipeline")
            graph.add_edge(p.name, other)
    try:
        order = list(nx.lexicographical_topological_sort(graph, key=lambda n: position[n]))
    except nx.NetworkXUnfeasible:
        cycle = " -> ".join(u for u, _ in nx.find_cycle(graph))
        raise PassError(f"pass ordering constraints form a cycle: {cycle}") from None
    by_name = {p.name: p for p in passes}
    return [by_name[n] for n in order]


class PassManager:
    """Runs an ordered pipeline over a Program.

    >>> pm = PassManager([])
    >>> pm.names()
    []
    """

    def __init__(self, passes: Iterable[Pass], available: Iterable[str] = ()):
        self.passes = order_passes(passes, available)

    def names(self) -> list[str]:
        return [p.name for p in self.passes]

    def run(self, program: Program, ctx: Optional[PassContext] = None) -> Program:
        ctx = ctx or PassContext()
        done: list[str] = []
        for p in self.passes:
            missing = [a for a in p.requires if not program.has(a)]
            if missing:
                raise PassError(f"pass '{p.name}' requires {', '.join(missing)}, not present"
                                f"{_before(done)}")
            for inst in ctx.instruments:
                inst.before_pass(p, program)
            start = time.perf_counter()
            try:
                changed = bool(p.run(program, ctx))
            except PlancError as exc:
                raise PassError(f"pass '{p.name}' failed: {exc}{_before(done)}") from exc
            except Exception as exc:
                raise PassError(f"pass '{p.name}' failed: {type(exc).__name__}: {exc}{_before(done)}") from exc
            record = PassRecord(p.name, time.perf_counter() - start, changed)
            program.log.append(record)
            unset = [a for a in p.provides if not program.has(a)]
            if unset:
                raise PassError(f"pass '{p.name}' did not provide {', '.join(unset)}{_before(done)}")
            for inst in ctx.instruments:
                inst.after_pass(p, program, record)
            done.append(p.name)
        return program


def _before(done: list[str]) -> str:
    return f" (after: {', '.join(done)})" if done else " (it ran first)"
