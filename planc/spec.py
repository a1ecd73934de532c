"""The user-facing model.yaml: what to compile.

```yaml
base: {name: base, path: ./models/base}          # HF-format checkpoint directory
variants:
  - {name: legal, path: ./models/legal}          # full or partial fine-tune, same architecture
  - {name: chat, adapter: ./models/chat-lora}    # PEFT LoRA adapter directory
backend: local
passes: ["./my_pass.py:CountParams"]             # optional extra passes, module:Class or file.py:Class
```

Relative paths resolve against the directory of the yaml file. Errors name the file and field.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from planc.errors import SpecError

_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BaseModelRef(_Strict):
    """The base model every variant is compared against."""

    name: str = Field("base", pattern=_NAME_PATTERN)
    """Name clients use in the `model` field of a request."""
    path: Path
    """HF-format checkpoint directory: config.json, *.safetensors (single or sharded), tokenizer."""


class LoraDecl(_Strict):
    """A LoRA adapter described for planning, when its files are not at hand."""

    r: int = Field(ge=1, le=4096)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"], min_length=1)
    """Linear names inside a decoder layer: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj."""


class VariantRef(_Strict):
    """A fine-tune of the base: full weights (`path`) or a PEFT LoRA adapter (`adapter`).

    For `planc plan` without the files, describe it instead: `changes` (the blocks a full or
    partial fine-tune changes: `embedding`, `head`, `layer.N` or `layers.A-B`) or `lora`.
    """

    name: str = Field(pattern=_NAME_PATTERN)
    path: Optional[Path] = None
    """HF-format checkpoint directory with the same architecture as the base."""
    adapter: Optional[Path] = None
    """PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors)."""
    changes: Optional[list[str]] = None
    """Plan-only description of a (partial) fine-tune: the blocks whose weights differ from the base."""
    lora: Optional[LoraDecl] = None
    """Plan-only description of a LoRA adapter."""

    @model_validator(mode="after")
    def _one_source(self) -> "VariantRef":
        if self.path is not None and self.adapter is not None:
            raise ValueError("give one of `path` (full weights) or `adapter` (PEFT LoRA), not both")
        if self.changes is not None and self.lora is not None:
            raise ValueError("give one of `changes` (a fine-tune) or `lora` (an adapter), not both")
        if self.path is None and self.adapter is None and self.changes is None and self.lora is None:
            raise ValueError("give `path` (full weights) or `adapter` (PEFT LoRA); "
                             "for planning without files, `changes` or `lora`")
        if (self.adapter is not None and self.changes is not None) or (self.path is not None and self.lora is not None):
            raise ValueError("`changes` describes a `path` variant and `lora` an `adapter` variant")
        return self

    @property
    def is_adapter(self) -> bool:
        return self.adapter is not None or self.lora is not None

    @property
    def declared_only(self) -> bool:
        """Described for planning; no files named."""
        return self.path is None and self.adapter is None

    @property
    def source(self) -> Optional[Path]:
        return self.path if self.path is not None else self.adapter


class ServingSettings(_Strict):
    """Runtime limits recorded in the bundle; `planc serve` flags override them."""

    kv_cache_mb: float = Field(64.0, gt=0)
    """Memory for the paged KV cache, shared by all layer-block instances."""
    page_size: int = Field(16, ge=1, le=1024)
    """Tokens per KV page."""
    max_running: int = Field(64, ge=1)
    """Sequences decoding at once. Unset, with a plan in the bundle: what the plan's copies hold
    (`Plan.engine_limits`); without one, 64."""
    max_batch_tokens: Optional[int] = Field(None, ge=1)
    """Tokens per engine step: one per decoding sequence, then prompt chunks (chunked prefill).
    Default: 512 on a CPU, 2048 on a GPU; with a plan in the bundle, per copy of a stage what its step
    carries at the plan's load, at least that default, summed over the copies (`Plan.engine_limits`)."""
    block_batch_cap: int = Field(256, ge=1)
    """Most sequences one block runs in one batched call. Unset, with a plan in the bundle: each
    planned block its layout's decode batch (one call, as the planner costed it); others 256."""
    max_queue: int = Field(256, ge=1)
    """Waiting requests before new ones get HTTP 429."""
    max_model_len: Optional[int] = Field(None, ge=1)
    """Longest prompt + completion; default: the model's max_position_embeddings, capped at 4096."""


class SLO(_Strict):
    ttft_ms: float = Field(2000.0, gt=0)
    """Time to first token a request may take (prefill of the mean prompt, through every stage)."""
    tpot_ms: float = Field(100.0, gt=0)
    """Time per output token once decoding."""


class PlanSettings(_Strict):
    """How `planc plan` (and `planc compile`) choose the deployment."""

    cluster: Optional[str] = None
    """Cluster file or name (`8xH100-80GB`, `local`); `planc plan --cluster` overrides it."""
    objective: Literal["throughput", "devices"] = "throughput"
    """`throughput`: most requests/s within the SLO on the cluster; `devices`: fewest devices that
    serve `rate` within the SLO."""
    slo: SLO = Field(default_factory=SLO)
    rate: Optional[float] = Field(None, gt=0)
    """Requests per second to serve (objective `devices`; default: the workload's rate)."""
    workload: Optional[Path] = None
    """Workload file (planc.workload): the variant mix and lengths; default uniform, below lengths."""
    prompt_tokens: int = Field(512, ge=1)
    """Mean prompt length when no workload is given."""
    output_tokens: int = Field(128, ge=1)
    """Mean completion length when no workload is given."""
    max_replicas: int = Field(8, ge=1, le=1024)
    """Most replicas of one block group."""
    time_limit_s: Optional[float] = Field(None, gt=0)
    """Wall-clock seconds the solver may search (the best placement so far is kept); default 5 s per
    node of the cluster, at most 45 s."""
    gap: float = Field(0.01, ge=0, le=1)
    """Relative MIP gap at which the solver may stop."""
    seed: int = Field(0, ge=0)
    solver: Literal["scip", "highs"] = "scip"
    simulate: bool = False
    """Also simulate the search's best candidates (the plan chosen by engine capacity and the next best
    placements it scored, 3 in all at most, and the greedy packer's) on planc's runtime, with the workload file
    replayed when there is one, and keep the one that sustains the highest rate within the SLO (slower:
    a capacity search per candidate, seconds to minutes)."""


class Tenant(_Strict):
    """A client identity: an API key (read from an environment variable) and the variants it may call."""

    name: str = Field(pattern=_NAME_PATTERN)
    api_key_env: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    """Name of the environment variable that holds the key at `planc serve` time (never the key itself)."""
    variants: list[str] = Field(default_factory=lambda: ["*"])
    """Variant names this tenant may use; `*` means all."""


class Spec(_Strict):
    """A validated model.yaml. Build it with :func:`load_spec`."""

    base: BaseModelRef
    variants: list[VariantRef] = Field(default_factory=list)
    backend: str = "local"
    """Which backend `planc compile` emits for: `local` (one process) or `ray` (stages as Ray actors,
    Ray Serve config, KubeRay manifest, Dockerfile)."""
    serving: ServingSettings = Field(default_factory=ServingSettings)
    tenants: list[Tenant] = Field(default_factory=list)
    """Optional API keys; with none, the server is open to every client."""
    plan: PlanSettings = Field(default_factory=PlanSettings)
    passes: list[str] = Field(default_factory=list)
    """Extra passes appended to the default pipeline: `package.module:Class` or `file.py:Class`."""
    source: Path = Field(default=Path("model.yaml"), exclude=True)
    """The yaml file itself (set by load_spec; not a key of the file)."""

    @field_validator("variants")
    @classmethod
    def _unique_variant_names(cls, variants: list[VariantRef]) -> list[VariantRef]:
        seen: set[str] = set()
        for v in variants:
            if v.name in seen:
                raise ValueError(f"duplicate variant name {v.name!r}")
            seen.add(v.name)
        return variants

    @model_validator(mode="after")
    def _base_name_unique(self) -> "Spec":
        if any(v.name == self.base.name for v in self.variants):
            raise ValueError(f"variant name {self.base.name!r} is already the base's name")
        return self

    @model_validator(mode="after")
    def _tenants_name_known_variants(self) -> "Spec":
        names = set(self.model_names())
        for i, t in enumerate(self.tenants):
            unknown = [v for v in t.variants if v != "*" and v not in names]
            if unknown:
                raise ValueError(f"tenants[{i}] ({t.name}) names unknown variants {unknown}")
        if len({t.name for t in self.tenants}) != len(self.tenants):
            raise ValueError("tenant names must be unique")
        return self

    @property
    def root(self) -> Path:
        return self.source.parent

    def model_names(self) -> list[str]:
        return [self.base.name] + [v.name for v in self.variants]


def _format_loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def _format_validation_error(path: Path, err: ValidationError) -> str:
    problems = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        problems.append(f"{_format_loc(loc)}: {msg}")
    return f"{path}: " + "; ".join(problems)


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys; a duplicated `base:` is a mistake worth a message."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_spec(path: str | Path) -> Spec:
    """Read and validate model.yaml; relative paths are resolved against its directory.

    >>> spec = load_spec("examples/tiny/model.yaml")  # doctest: +SKIP
    >>> spec.base.name  # doctest: +SKIP
    'base'
    """
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"{path}: no such file")
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except UnicodeDecodeError as exc:
        raise SpecError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise SpecError(f"{path}{where}: YAML syntax error: {problem}") from None
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: expected a mapping with `base` and `variants`, got {type(raw).__name__}")
    try:
        spec = Spec.model_validate(raw)
    except ValidationError as exc:
        raise SpecError(_format_validation_error(path, exc)) from None
    root = path.resolve().parent
    return spec.model_copy(update={
        "source": path.resolve(),
        "plan": spec.plan.model_copy(update={"workload": _resolve(root, spec.plan.workload)}),
        "base": spec.base.model_copy(update={"path": _resolve(root, spec.base.path)}),
        "variants": [_resolve_variant(root, v) for v in spec.variants],
    })


def _resolve(root: Path, p: Optional[Path]) -> Optional[Path]:
    if p is None:
        return None
    p = p.expanduser()
    return p if p.is_absolute() else (root / p)


def _resolve_variant(root: Path, v: VariantRef) -> VariantRef:
    return v.model_copy(update={"path": _resolve(root, v.path), "adapter": _resolve(root, v.adapter)})


def field_of(spec: Spec, model_name: str) -> str:
    """The yaml field that names a model's files, for error messages (e.g. `variants[2].adapter`)."""
    if model_name == spec.base.name:
        return "base.path"
    for i, v in enumerate(spec.variants):
        if v.name == model_name:
            kind = "path" if v.path is not None else "adapter" if v.adapter is not None else \
                "changes" if v.changes is not None else "lora"
            return f"variants[{i}].{kind}"
    raise KeyError(model_name)


