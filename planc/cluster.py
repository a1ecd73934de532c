"""The hardware a plan targets: devices, nodes and links.

A cluster file (YAML), or just a name (`H100-80GB`, `8xH100-80GB`, `local`):

```yaml
nodes: 1
devices_per_node: 8
device: H100-80GB          # a shipped profile (planc/profiles/), a profile file, or a mapping:
                           # {name, memory_gb, peak_tflops: {bf16: ..}, mem_bw_gbps}
links: {intra_node_gbps: 900, inter_node_gbps: 400, latency_us: 5}
```
Every `*_gbps` figure is in gigabytes per second (bytes, not bits), as on GPU datasheets:
`inter_node_gbps` is a node's aggregate network bandwidth (8 x 400 Gb/s NICs = 400 GB/s).
`local` is this machine, from the profile `planc profile` wrote (measured on first use if absent).

>>> c = load_cluster("2xH100-80GB")
>>> c.num_devices, c.device.memory_gb
(2, 80.0)
"""
from __future__ import annotations

import bisect
import math
import re
from importlib import resources
from pathlib import Path
from typing import Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from planc.errors import SpecError

LOCAL_PROFILE = Path("~/.cache/planc/local-profile.yaml")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Overheads(_Strict):
    """Fixed costs of planc's runtime that no roofline sees (Python, kernel launches), in microseconds."""

    step_us: float = Field(0.0, ge=0)
    """Per engine step (scheduling, sampling)."""
    block_call_us: float = Field(0.0, ge=0)
    """Per batched block call."""
    per_seq_us: float = Field(0.0, ge=0)
    """Per sequence in a block call (bookkeeping, per-sequence attention calls)."""
    per_token_us: float = Field(0.0, ge=0)
    """Per prefill token in a block call (position and RoPE tensors, per-token elementwise work)."""
    decode_call_us: float = Field(0.0, ge=0)
    """Per batched decode attention call (two or more decodes in one block call: slot writes, page
    tables, gathers and einsums that a lone decode's call does not make)."""
    server_token_us: float = Field(0.0, ge=0)
    """CPU time `planc serve`'s asyncio thread spends per streamed token (detokenize, JSON, SSE write), holding
    the GIL the engine thread also needs; 0 where unmeasured (shipped GPU profiles)."""
    server_request_us: float = Field(0.0, ge=0)
    """The same thread's CPU time per request (parse, tokenize, response setup, metrics)."""
    engine_token_us: float = Field(0.0, ge=0)
    """Time the engine thread loses per token `planc serve` streams (GIL handoffs to the asyncio thread, the
    caches it disturbs): measured on timed engine steps of a live planc serve (each step's wall minus the
    engine thread's CPU, `planc.profile_server.measure_toll`); it lengthens the engine step during which the
    token is streamed."""
    engine_step_us: float = Field(0.0, ge=0)
    """The same, per step that streams tokens (the server wakes for the step's tokens, however many)."""
    engine_request_us: float = Field(0.0, ge=0)
    """The same, per request."""


class MatmulLinear(_Strict):
    """One measured weight shape of a MatmulTable."""

    shape: tuple[int, int]
    """(out_features, in_features), as torch.nn.Linear stores the weight."""
    us: list[float] = Field(min_length=2)
    """Microseconds of one call at the table's first len(us) row counts (larger ones are extrapolated)."""

    @field_validator("shape")
    @classmethod
    def _dims(cls, v: tuple[int, int]) -> tuple[int, int]:
        if min(v) < 1:
            raise ValueError("out and in features must be >= 1")
        return v

    @field_validator("us")
    @classmethod
    def _times(cls, v: list[float]) -> list[float]:
        if any(t <= 0 for t in v):
            raise ValueError("times must be positive")
        return v


class MatmulTable(_Strict):
    """Measured time of `F.linear(x (rows, in), w (out, in))` over a grid of weight shapes and row counts.

    A roofline takes a matmul as max(FLOPs / peak, weight bytes / bandwidth); on a CPU's one-thread BLAS a
    call of a few rows packs the weight first and does not overlap that with the arithmetic, so the
    roofline misses it by up to 3x (benchmarks/RESULTS.md, "Simulator fidelity"). Lookups interpolate
    log time piecewise linearly in log rows, then bilinearly in (log in, log out) over the grid; beyond
    the grid a weight is charged in proportion to its size, beyond the last row count by the last
    measured time per row.

    >>> t = MatmulTable(rows=[1, 2], linears=[MatmulLinear(shape=(n, k), us=[n * k / 1e3, n * k / 5e2])
    ...                                        for n in (64, 256) for k in (64, 256)])
    >>> round(t.linear_us(2, 128, 128), 2), round(t.linear_us(4, 512, 256), 2)  # inside; beyond rows and out
    (32.77, 524.29)
    """

    dtype: str = "fp32"
    cold: bool = True
    """Weights read from memory, not a cache a previous call warmed (as in a step over many layers)."""
    scale: float = Field(1.0, gt=0)
    """Every lookup is multiplied by this: live engine steps over isolated calls, fitted by `planc profile`
    on a live run (the other ops of a step between the Linears make them slower than alone)."""
    rows: list[int] = Field(min_length=2)
    linears: list[MatmulLinear] = Field(min_length=1)

    @field_validator("rows")
    @classmethod
    def _increasing(cls, v: list[int]) -> list[int]:
        if v[0] < 1 or any(b <= a for a, b in zip(v, v[1:])):
            raise ValueError("rows must be increasing counts >= 1")
        return v

    @model_validator(mode="after")
    def _grid(self) -> "MatmulTable":
        shapes = {lin.shape for lin in self.linears}
        outs, ins = sorted({n for n, _ in shapes}), sorted({k for _, k in shapes})
        missing = [(n, k) for n in outs for k in ins if (n, k) not in shapes]
        if missing or len(shapes) != len(self.linears):
            raise ValueError(f"linears must be a grid of distinct (out, in) shapes; missing {missing[:3]}")
        if any(len(lin.us) > len(self.rows) for lin in self.linears):
            raise ValueError("a linear has more times than the table has row counts")
        return self

    def linear_us(self, rows: int, out_features: int, in_features: int) -> float:
        """Microseconds of one Linear of weight (out_features, in_features) over `rows` rows."""
        if rows <= 0:
            return 0.0
        grid = self._by_shape()
        outs, ins = sorted({n for n, _ in grid}), sorted({k for _, k in grid})
        (n0, n1, fn), scale_n = _bracket(outs, out_features)
        (k0, k1, fk), scale_k = _bracket(ins, in_features)

        def at(n: int, k: int) -> float:
            return math.log(_row_time(self.rows, grid[(n, k)], rows))
        log_t = (1 - fn) * ((1 - fk) * at(n0, k0) + fk * at(n0, k1)) + fn * ((1 - fk) * at(n1, k0) + fk * at(n1, k1))
        return math.exp(log_t) * scale_n * scale_k * self.scale

    def _by_shape(self) -> dict[tuple[int, int], list[float]]:
        return {lin.shape: lin.us for lin in self.linears}


def _bracket(axis: list[int], x: float) -> tuple[tuple[int, int, float], float]:
    """Grid points around `x` on `axis` with the log-space weight of the upper one, and the factor a
    size outside the axis is scaled by (work and bytes both grow in proportion to a dimension)."""
    if x <= axis[0] or len(axis) == 1:
        edge = axis[0] if x <= axis[0] else axis[-1]
        return (edge, edge, 0.0), x / edge
    if x >= axis[-1]:
        return (axis[-1], axis[-1], 0.0), x / axis[-1]
    i = bisect.bisect_right(axis, x) - 1
    lo, hi = axis[i], axis[i + 1]
    return (lo, hi, math.log(x / lo) / math.log(hi / lo)), 1.0


def _row_time(rows: list[int], us: list[float], m: int) -> float:
    """Time at `m` rows: log-log interpolation between measured row counts; past the last one, the last
    segment's time per extra row (by then the call is compute-bound and grows linearly)."""
    xs = rows[:len(us)]
    if m <= xs[0]:
        return us[0]
    if m >= xs[-1]:
        return us[-1] + (m - xs[-1]) * max(0.0, (us[-1] - us[-2]) / (xs[-1] - xs[-2]))
    i = bisect.bisect_right(xs, m) - 1
    f = math.log(m / xs[i]) / math.log(xs[i + 1] / xs[i])
    return math.exp((1 - f) * math.log(us[i]) + f * math.log(us[i + 1]))


class DeviceProfile(_Strict):
    """One accelerator (or this CPU): capacity and speed, from a datasheet or measured."""

    name: str
    kind: str = Field("gpu", pattern="^(gpu|cpu)$")
    memory_gb: float = Field(gt=0)
    """Memory per device in GB (1e9 bytes)."""
    memory_utilization: float = Field(0.9, gt=0, le=1)
    """Share of memory planc may fill (weights + KV + activations), as vLLM's gpu_memory_utilization."""
    peak_tflops: dict[str, float]
    """Peak dense FLOP/s per dtype, in TFLOP/s: {bf16: 989.4, fp32: 67}."""
    mem_bw_gbps: float = Field(gt=0)
    nvlink_gbps: Optional[float] = Field(None, gt=0)
    matmul_efficiency: float = Field(0.7, gt=0, le=1)
    """Achieved share of peak FLOP/s for large matmuls (measured profiles put 1.0: peak is measured)."""
    bw_efficiency: float = Field(0.8, gt=0, le=1)
    """Achieved share of memory bandwidth when streaming weights and KV."""
    overheads: Overheads = Field(default_factory=Overheads)
    matmul_table: Optional[MatmulTable] = None
    """Measured Linear times (`planc profile` on a CPU); the cost model uses them instead of the roofline's
    matmul term. Absent (datasheet profiles, profiles written before the table existed): roofline."""
    source: str = ""
    """Where the figures come from (datasheet, or `planc profile` on which host, when)."""

    @field_validator("peak_tflops")
    @classmethod
    def _positive(cls, v: dict[str, float]) -> dict[str, float]:
        if not v or any(x <= 0 for x in v.values()):
            raise ValueError("needs at least one dtype with a positive TFLOP/s figure")
        return v

    def flops(self, dtype: str) -> float:
        """Peak FLOP/s for `dtype` (bf16 falls back to fp16 and the reverse; else the slowest listed)."""
        for key in (dtype, {"bf16": "fp16", "fp16": "bf16"}.get(dtype, dtype)):
            if key in self.peak_tflops:
                return self.peak_tflops[key] * 1e12
        return min(self.peak_tflops.values()) * 1e12

    @property
    def usable_bytes(self) -> float:
        return self.memory_gb * 1e9 * self.memory_utilization


class Links(_Strict):
    intra_node_gbps: float = Field(900.0, gt=0)
    inter_node_gbps: float = Field(50.0, gt=0)
    latency_us: float = Field(5.0, ge=0)
    """Per message (collective step or pipeline hop)."""


class Cluster(_Strict):
    nodes: int = Field(1, ge=1, le=4096)
    devices_per_node: int = Field(ge=1, le=64)
    device: DeviceProfile
    links: Links = Field(default_factory=Links)
    name: str = ""

    @property
    def num_devices(self) -> int:
        return self.nodes * self.devices_per_node

    def tp_degrees(self) -> list[int]:
        """Tensor-parallel degrees that fit inside one node (powers of two)."""
        return [t for t in (1, 2, 4, 8, 16, 32, 64) if t <= self.devices_per_node]

    def describe(self) -> str:
        d = self.device
        return (f"{self.nodes} node(s) x {self.devices_per_node} {d.name} ({d.memory_gb:g} GB, "
                f"{max(d.peak_tflops.values()):g} TFLOP/s, {d.mem_bw_gbps:g} GB/s)")


def shipped_profiles() -> list[str]:
    return sorted(p.name.removesuffix(".yaml") for p in resources.files("planc.profiles").iterdir()
                  if p.name.endswith(".yaml"))


def load_device(ref: Union[str, dict], where: str = "device") -> DeviceProfile:
    """A device from a shipped profile name, a profile file, or a mapping."""
    if isinstance(ref, dict):
        return _validate(DeviceProfile, ref, where)
    if ref == "local":
        return load_local_profile()
    if ref in shipped_profiles():
        text = resources.files("planc.profiles").joinpath(f"{ref}.yaml").read_text(encoding="utf-8")
        return _validate(DeviceProfile, yaml.safe_load(text), f"profile {ref}")
    path = Path(ref).expanduser()
    if path.is_file():
        return _validate(DeviceProfile, _read_yaml(path), str(path))
    raise SpecError(f"{where}: unknown device {ref!r}; shipped profiles: {', '.join(shipped_profiles())}, "
                    "`local`, or a profile file")


def load_local_profile(path: Optional[Path] = None) -> DeviceProfile:
    """This machine's measured profile; measured now (a few seconds) if `planc profile` never ran."""
    path = (path or LOCAL_PROFILE).expanduser()
    if path.is_file():
        return _validate(DeviceProfile, _read_yaml(path), str(path))
    from planc.profile import measure_local, write_profile

    profile = measure_local()
    write_profile(profile, path)
    return profile


_NAMED = re.compile(r"^(?:(\d+)x)?(?:(\d+)x)?([A-Za-z0-9._-]+)$")


def load_cluster(ref: Union[str, Path]) -> Cluster:
    """A cluster from a YAML file or a name: `H100-80GB` (1 device), `8xH100-80GB`, `4x8xH100-80GB`
    (4 nodes of 8), or `local` (this machine, one device)."""
    path = Path(ref).expanduser()
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise SpecError(f"{path}: no such file")
        raw = _read_yaml(path)
        if not isinstance(raw, dict):
            raise SpecError(f"{path}: expected a mapping with nodes, devices_per_node, device, links")
        device = load_device(raw.get("device", ""), f"{path}: device")
        links = raw.get("links", {})
        if isinstance(links, dict):  # unset figures as a named cluster of this device has them
            links = {**default_links(device), **links}
        return _validate(Cluster, {**raw, "device": device, "links": links, "name": raw.get("name", path.stem)},
                         str(path))
    m = _NAMED.match(str(ref))
    if not m:
        raise SpecError(f"cluster {ref!r}: expected a YAML file or a name like 8xH100-80GB")
    a, b, device_name = m.groups()
    nodes, per_node = (int(a), int(b)) if b else (1, int(a or 1))
    device = load_device(device_name, f"cluster {ref!r}")
    return Cluster(nodes=nodes, devices_per_node=per_node, device=device, links=Links(**default_links(device)),
                   name=str(ref))


def default_links(device: DeviceProfile) -> dict[str, float]:
    """Link figures a cluster of `device` has unless its file sets them: within a node the profile's fitted
    all-reduce bandwidth (`nvlink_gbps`), a CPU's memory bandwidth, else 900 GB/s (NVLink 4)."""
    return {"intra_node_gbps": device.nvlink_gbps or (device.mem_bw_gbps if device.kind == "cpu" else 900.0)}


def _read_yaml(path: Path):
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise SpecError(f"{path}: YAML syntax error: {str(exc).splitlines()[0]}") from None


def _validate(model, raw, where: str):
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '(top level)'}: "
                             f"{'unknown key' if e['type'] == 'extra_forbidden' else e['msg']}"
                             for e in exc.errors())
        raise SpecError(f"{where}: {problems}") from None
