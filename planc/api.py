"""The library API: load -> compile -> emit.

>>> import planc
>>> program = planc.load("examples/tiny/model.yaml")                          # doctest: +SKIP
>>> program = planc.compile(program, passes=planc.default_pipeline() + [MyPass()])  # doctest: +SKIP
>>> planc.emit(program, backend="local", out="bundle/")                       # doctest: +SKIP
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
from pathlib import Path
from typing import Callable, Optional, Sequence

from planc.backends import get_backend
from planc.bundle_write import (build_manifest, write_adapters, write_blocks, write_kernel_configs,
                                write_manifest, write_tokenizers)
from planc.errors import PlancError, SpecError
from planc.pass_manager import Pass, PassContext, PassManager
from planc.passes import default_pipeline, plan_pipeline
from planc.program import Program, open_models
from planc.spec import load_spec
from planc.store import staging_dir


def load(spec_path: str | Path, weights: bool = True) -> Program:
    """Read model.yaml and open every model lazily (headers and configs; no tensor bytes).

    With ``weights=False`` only config.json files are read: enough to trace on the meta device.
    """
    spec = load_spec(spec_path)
    return Program(spec=spec, models=open_models(spec, weights=weights))


def compile(program: Program, passes: Optional[Sequence[Pass]] = None,
            ctx: Optional[PassContext] = None) -> Program:
    """Run `passes` (default: :func:`default_pipeline`, then the planner's cost and parallelize passes
    when a cluster is named in `plan.cluster` or the `cost` pass options) plus the spec's `passes:`."""
    ctx = ctx or PassContext()
    pipeline = list(passes) if passes is not None else default_pipeline()
    if passes is None and (program.spec.plan.cluster or ctx.options_for("cost").get("cluster")):
        pipeline += plan_pipeline()
    names = {p.name for p in pipeline}
    for i, ref in enumerate(program.spec.passes):
        where = f"{program.spec.source}: passes[{i}]"
        p = load_pass(ref, program.spec.root, where)
        if p.name in names:
            raise SpecError(f"{where}: a pass named {p.name!r} is already in the pipeline")
        pipeline.append(p)
        names.add(p.name)
    return PassManager(pipeline).run(program, ctx)


def emit(program: Program, backend: Optional[str] = None, out: str | Path = "bundle",
         ctx: Optional[PassContext] = None, progress: Optional[Callable[[str], None]] = None) -> Path:
    """Write the bundle for `backend` (default: the spec's) to `out`, atomically."""
    for needed in ("zoo", "chains", "adapter_zoo"):
        if not program.has(needed):
            raise PlancError(f"emit needs a compiled program ({needed} is missing); run planc.compile first")
    ctx = ctx or PassContext()
    target = get_backend(backend or program.spec.backend)
    out = Path(out)
    with staging_dir(out) as root:
        blocks = write_blocks(program, root, progress)
        adapters = write_adapters(program, root, progress)
        tokenizers, tokenizer_of = write_tokenizers(program, root)
        entry_points = target.emit(program, root, ctx)
        kernels = write_kernel_configs(program, root)
        settings = {"passes": [r.name for r in program.log], "options": _plain(ctx.options)}
        manifest = build_manifest(program, target.name, blocks, adapters, tokenizers, tokenizer_of,
                                  entry_points, settings)
        manifest["kernels"] = kernels
        manifest["report"] = write_report(root, manifest, program)
        write_manifest(root, manifest)
    return out


def write_report(root: Path, manifest: dict, program: Program) -> dict:
    """report.html: sharing, placement, predicted latency (for people; verified like every file)."""
    from planc.bundle_report import render
    from planc.store import file_sha256

    usable = None
    if program.plan is not None and "plan_inputs" in program.extras:
        usable = program.extras["plan_inputs"]["cluster"].device.usable_bytes / 1e9
    path = root / "report.html"
    path.write_text(render(manifest, program.plan, usable), encoding="utf-8")
    return {"file": "report.html", "sha256": file_sha256(path)}


def _plain(options: dict) -> dict:
    """Pass options as JSON (a Cluster object given in place of its name is recorded by name)."""
    import json

    out = {}
    for name, opts in options.items():
        out[name] = {k: (v if isinstance(v, (str, int, float, bool, type(None), list, dict)) else
                         getattr(v, "name", None) or type(v).__name__) for k, v in opts.items()}
    json.dumps(out)
    return out


def load_pass(ref: str, root: Path, where: str) -> Pass:
    """Import a pass from `package.module:Name` or `path/to/file.py:Name` (relative to `root`)."""
    module_ref, sep, attr = ref.partition(":")
    if not sep or not attr:
        raise SpecError(f"{where}: expected `module:Class` or `file.py:Class`, got {ref!r}")
    try:
        if module_ref.endswith(".py"):
            path = (root / module_ref) if not Path(module_ref).is_absolute() else Path(module_ref)
            if not path.is_file():
                raise SpecError(f"{where}: {path} does not exist")
            mod_spec = importlib.util.spec_from_file_location(f"planc_user_pass_{path.stem}", path)
            module = importlib.util.module_from_spec(mod_spec)
            mod_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_ref)
    except SpecError:
        raise
    except Exception as exc:
        raise SpecError(f"{where}: cannot import {module_ref}: {type(exc).__name__}: {exc}") from None
    obj = getattr(module, attr, None)
    if obj is None:
        raise SpecError(f"{where}: {module_ref} has no {attr!r}")
    if inspect.isclass(obj) and issubclass(obj, Pass):
        obj = obj()
    if not isinstance(obj, Pass):
        raise SpecError(f"{where}: {ref} is not a planc Pass (subclass planc.Pass or use @planc.function_pass)")
    return obj
