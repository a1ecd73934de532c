"""Human-readable output: compile progress, the compile summary, and `planc inspect` tables."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from planc.bundle import Bundle
from planc.pass_manager import PassContext
from planc.program import PassRecord, Program


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError


class CompileProgress:
    """Rich progress bars for `planc compile`: one for the passes, one for the files written.

    It is also a pass-manager instrument (before_pass/after_pass).
    """

    def __init__(self, console: Console):
        self.progress = Progress(TextColumn("{task.description:<28}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), console=console, transient=True,
                                 disable=not console.is_terminal)
        self._passes: Optional[int] = None
        self._files: Optional[int] = None
        self._ctx = PassContext(instruments=[self])

    def __enter__(self) -> "CompileProgress":
        self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)

    def context(self) -> PassContext:
        return self._ctx

    def start(self, program: Program, planned: bool = False, extra: int = 0) -> None:
        from planc.passes import default_pipeline, plan_pipeline

        total = len(default_pipeline()) + len(program.spec.passes) + (len(plan_pipeline()) if planned else 0) + extra
        self._passes = self.progress.add_task(f"compiling {len(program.models)} models", total=total)

    def before_pass(self, p, program: Program) -> None:
        if self._passes is not None:
            self.progress.update(self._passes, description=f"pass {p.name}")

    def after_pass(self, p, program: Program, record: PassRecord) -> None:
        if self._passes is not None:
            self.progress.advance(self._passes)

    def writing(self, total: int) -> None:
        self._files = self.progress.add_task("writing blocks", total=total)

    def wrote(self, what: str) -> None:
        if self._files is not None:
            self.progress.update(self._files, advance=1, description=f"wrote {what}")


def compile_summary(console: Console, program: Program, bundle: Path, seconds: float) -> None:
    passes = Table(title="passes", title_justify="left", show_edge=False)
    passes.add_column("pass")
    passes.add_column("seconds", justify="right")
    for r in program.log:
        passes.add_row(r.name, f"{r.seconds:.3f}")
    console.print(passes)
    b = Bundle.open(bundle, verify=False)
    t = b.manifest["totals"]
    console.print(
        f"compiled {len(program.models)} models ({', '.join(program.models)}) into {bundle}: "
        f"{len(program.zoo)} unique blocks, {len(program.adapter_zoo)} adapter deltas; "
        f"stored {human_bytes(t['stored_bytes'])} for {human_bytes(t['logical_bytes'])} of chains "
        f"(dedupe {t['dedupe_ratio']:.2f}x) in {seconds:.1f} s", markup=False)
    if b.plan is not None:
        from planc.plan_report import solver_line

        p = b.plan.predicted
        console.print(f"plan for {b.plan.cluster}: {len(b.plan.groups)} block groups on {p['devices']} devices, "
                      f"predicted {p['throughput_rps']:.3g} req/s; " + solver_line(b.plan), markup=False)


def _block_labels(bundle: Bundle) -> dict[str, str]:
    return {key: f"#{i}" for i, key in enumerate(bundle.blocks)}


def inspect_tables(console: Console, bundle: Bundle) -> None:
    labels = _block_labels(bundle)
    variants = list(bundle.variants.values())
    first = variants[0]["chain"]
    names = [bundle.blocks[link["block"]]["name"] for link in first]
    short = [n.replace("embedding", "emb").replace("layer.", "L") for n in names]
    matrix = Table(title="chains: unique block per position (green: shared by several variants; +A: LoRA delta)",
                   title_justify="left")
    matrix.add_column("variant")
    matrix.add_column("kind")
    wide = len(names) > 24
    if wide:
        matrix.add_column("chain (■ shared, □ own, ▣ shared+adapter)")
    else:
        for s in short:
            matrix.add_column(s, justify="center")
    matrix.add_column("shared", justify="right")
    for v in variants:
        cells = []
        shared = 0
        for link in v["chain"]:
            entry = bundle.blocks[link["block"]]
            is_shared = len(set(entry["users"])) > 1
            shared += is_shared
            if wide:
                cells.append("▣" if link["adapter"] else ("■" if is_shared else "□"))
            else:
                text = labels[link["block"]] + ("+A" if link["adapter"] else "")
                cells.append(f"[green]{text}[/green]" if is_shared else f"[yellow]{text}[/yellow]")
        row = [v["name"], v["kind"]] + (["".join(cells)] if wide else cells) + [f"{shared}/{len(v['chain'])}"]
        matrix.add_row(*row)
    console.print(matrix)

    blocks = Table(title="unique blocks", title_justify="left")
    for col in ("id", "block", "params", "bytes", "used by", "file"):
        blocks.add_column(col, justify="right" if col in ("params", "bytes") else "left")
    for key, entry in bundle.blocks.items():
        blocks.add_row(labels[key], entry["name"], f"{entry['num_params']:,}", human_bytes(entry["nbytes"]),
                       ", ".join(dict.fromkeys(entry["users"])), entry["file"].split("/")[-1][:12] + "…")
    console.print(blocks)

    t = bundle.manifest["totals"]
    console.print(f"logical {human_bytes(t['logical_bytes'])} (sum of every variant's chain) · stored "
                  f"{human_bytes(t['stored_bytes'])} · unique parameters {human_bytes(t['unique_param_bytes'])} · "
                  f"dedupe ratio {t['dedupe_ratio']:.2f}x", markup=False)
