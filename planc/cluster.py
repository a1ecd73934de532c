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

import re
from importlib import resources
from pathlib import Path
from typing import Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

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
        return _validate(Cluster, {**raw, "device": device, "name": raw.get("name", path.stem)}, str(path))
    m = _NAMED.match(str(ref))
    if not m:
        raise SpecError(f"cluster {ref!r}: expected a YAML file or a name like 8xH100-80GB")
    a, b, device_name = m.groups()
    nodes, per_node = (int(a), int(b)) if b else (1, int(a or 1))
    device = load_device(device_name, f"cluster {ref!r}")
    links = Links(intra_node_gbps=device.nvlink_gbps or (device.mem_bw_gbps if device.kind == "cpu" else 900.0))
    return Cluster(nodes=nodes, devices_per_node=per_node, device=device, links=links, name=str(ref))


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
