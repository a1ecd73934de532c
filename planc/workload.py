"""Workloads: the request streams that `planc plan` simulates and `planc bench` sends.

One model for both, so a simulated run and a measured run see the same requests. A workload is
either a BurstGPT-format CSV (columns ``Timestamp, Model, Request tokens, Response tokens, Total
tokens, Log Type``) replayed with optional time scaling and a row limit, or synthetic: Gamma
inter-arrival times with a rate and a coefficient of variation, and request/response lengths from
a parametric or empirical distribution. A workload file is YAML:

```yaml
# synthetic
kind: gamma
rate: 4.0            # requests per second
cv: 2.0              # coefficient of variation of inter-arrival times (1 = Poisson)
num_requests: 200
prompt_tokens: {dist: lognormal, mean: 300, cv: 1.0, min: 4, max: 2000}
output_tokens: {dist: uniform, low: 16, high: 256}
variants: {legal: 3, chat: 1}   # weights; omitted: uniform over the spec's variants
seed: 0
```
```yaml
# replay
kind: burstgpt
path: BurstGPT_1.csv
time_scale: 0.1      # multiply gaps by this (0.1 = ten times faster)
max_rows: 1000
model_map: {ChatGPT: legal, GPT-4: chat}   # Model column -> variant; unmapped rows are hashed
```

>>> spec = GammaWorkload(rate=2.0, cv=1.0, num_requests=3, prompt_tokens=Fixed(value=8),
...                      output_tokens=Fixed(value=4))
>>> [r.prompt_tokens for r in spec.requests(["a", "b"])]
[8, 8, 8]
"""
from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal, Optional, Union

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from planc.errors import SpecError

BURSTGPT_COLUMNS = ("Timestamp", "Model", "Request tokens", "Response tokens", "Total tokens", "Log Type")


@dataclass(frozen=True)
class Request:
    """One request of a workload: when it arrives (seconds from the start) and how long it is."""

    arrival_s: float
    variant: str
    prompt_tokens: int
    output_tokens: int


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Fixed(_Strict):
    dist: Literal["fixed"] = "fixed"
    value: int = Field(ge=1)

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return np.full(n, self.value, dtype=np.int64)


class Uniform(_Strict):
    """Integers uniform on [low, high]."""

    dist: Literal["uniform"] = "uniform"
    low: int = Field(ge=1)
    high: int = Field(ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> "Uniform":
        if self.high < self.low:
            raise ValueError(f"high ({self.high}) is below low ({self.low})")
        return self

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return rng.integers(self.low, self.high + 1, size=n)


class LogNormal(_Strict):
    """Log-normal with the given mean and coefficient of variation, rounded and clipped to [min, max]."""

    dist: Literal["lognormal"] = "lognormal"
    mean: float = Field(gt=0)
    cv: float = Field(1.0, gt=0)
    min: int = Field(1, ge=1)
    max: int = Field(1_000_000, ge=1)

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        sigma2 = np.log1p(self.cv ** 2)
        mu = np.log(self.mean) - sigma2 / 2
        values = np.rint(rng.lognormal(mu, np.sqrt(sigma2), size=n)).astype(np.int64)
        return np.clip(values, self.min, self.max)


class Empirical(_Strict):
    """Draw from observed values (with replacement)."""

    dist: Literal["empirical"] = "empirical"
    values: list[int] = Field(min_length=1)

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return rng.choice(np.asarray(self.values, dtype=np.int64), size=n, replace=True)


LengthDist = Annotated[Union[Fixed, Uniform, LogNormal, Empirical], Field(discriminator="dist")]


class _WorkloadBase(_Strict):
    variants: Optional[dict[str, float]] = None
    """Weights per variant; omitted: uniform over the variants the caller serves."""
    seed: int = 0
    max_prompt_tokens: Optional[int] = Field(None, ge=1)
    """Clip prompts to this many tokens (e.g. to fit the served context)."""
    max_output_tokens: Optional[int] = Field(None, ge=1)

    def _weights(self, variants: list[str]) -> tuple[list[str], np.ndarray]:
        if not self.variants:
            return list(variants), np.full(len(variants), 1.0 / len(variants))
        unknown = sorted(set(self.variants) - set(variants))
        if unknown:
            raise SpecError(f"workload names unknown variants {unknown}; served: {sorted(variants)}")
        names = list(self.variants)
        w = np.asarray([self.variants[n] for n in names], dtype=np.float64)
        if (w < 0).any() or w.sum() <= 0:
            raise SpecError("workload variant weights must be >= 0 with a positive sum")
        return names, w / w.sum()

    def _clip(self, prompt: np.ndarray, output: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        prompt = np.maximum(prompt, 1)
        output = np.maximum(output, 1)
        if self.max_prompt_tokens is not None:
            prompt = np.minimum(prompt, self.max_prompt_tokens)
        if self.max_output_tokens is not None:
            output = np.minimum(output, self.max_output_tokens)
        return prompt, output


class GammaWorkload(_WorkloadBase):
    """Synthetic open-loop arrivals: Gamma inter-arrival times (cv=1 is Poisson, larger is burstier)."""

    kind: Literal["gamma"] = "gamma"
    rate: float = Field(gt=0)
    """Mean requests per second."""
    cv: float = Field(1.0, gt=0)
    num_requests: int = Field(ge=1, le=10_000_000)
    prompt_tokens: LengthDist
    output_tokens: LengthDist

    def requests(self, variants: list[str]) -> list[Request]:
        rng = np.random.default_rng(self.seed)
        shape = 1.0 / self.cv ** 2
        gaps = rng.gamma(shape, 1.0 / (self.rate * shape), size=self.num_requests)
        arrivals = np.cumsum(gaps) - gaps[0]  # the first request arrives at t=0
        names, weights = self._weights(variants)
        chosen = rng.choice(len(names), size=self.num_requests, p=weights)
        prompt, output = self._clip(self.prompt_tokens.sample(rng, self.num_requests),
                                    self.output_tokens.sample(rng, self.num_requests))
        return [Request(float(t), names[v], int(p), int(o))
                for t, v, p, o in zip(arrivals, chosen, prompt, output)]


class BurstGPTWorkload(_WorkloadBase):
    """Replay of a BurstGPT-format trace."""

    kind: Literal["burstgpt"] = "burstgpt"
    path: Path
    time_scale: float = Field(1.0, gt=0)
    """Multiplies every gap between arrivals (0.1 replays ten times faster)."""
    max_rows: Optional[int] = Field(None, ge=1)
    skip_failed: bool = True
    """Drop rows with 0 response tokens (failed requests in BurstGPT)."""
    model_map: dict[str, str] = Field(default_factory=dict)
    """Model column value -> variant. Rows whose Model is not mapped are spread by a hash of the row
    (weighted by `variants` when given), so the same trace always maps the same way."""

    def requests(self, variants: list[str]) -> list[Request]:
        rows = read_burstgpt(self.path, self.max_rows, self.skip_failed)
        unknown = sorted(set(self.model_map.values()) - set(variants))
        if unknown:
            raise SpecError(f"workload model_map names unknown variants {unknown}; served: {sorted(variants)}")
        names, weights = self._weights(variants)
        cumulative = np.cumsum(weights)
        t0 = rows[0][0] if rows else 0.0
        prompt, output = self._clip(np.asarray([r[2] for r in rows], dtype=np.int64),
                                    np.asarray([r[3] for r in rows], dtype=np.int64))
        out = []
        for i, (ts, model, _, _) in enumerate(rows):
            variant = self.model_map.get(model)
            if variant is None:
                u = _row_uniform(i, ts, model)
                variant = names[min(int(np.searchsorted(cumulative, u, side="right")), len(names) - 1)]
            out.append(Request((ts - t0) * self.time_scale, variant, int(prompt[i]), int(output[i])))
        return out


Workload = Annotated[Union[GammaWorkload, BurstGPTWorkload], Field(discriminator="kind")]
_WORKLOAD = TypeAdapter(Workload)


def _row_uniform(index: int, timestamp: float, model: str) -> float:
    digest = hashlib.sha256(f"{index}:{timestamp!r}:{model}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def read_burstgpt(path: Path, max_rows: Optional[int] = None,
                  skip_failed: bool = True) -> list[tuple[float, str, int, int]]:
    """(timestamp, model, request tokens, response tokens) per row, sorted by timestamp."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"{path}: no such file")
    rows = []
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        header = [h.strip() for h in (reader.fieldnames or [])]
        missing = [c for c in BURSTGPT_COLUMNS[:4] if c not in header]
        if missing:
            raise SpecError(f"{path}: not a BurstGPT-format CSV: missing columns {missing} (has {header})")
        reader.fieldnames = header
        for line, row in enumerate(reader, start=2):
            try:
                ts = float(row["Timestamp"])
                req, resp = int(float(row["Request tokens"])), int(float(row["Response tokens"]))
            except (TypeError, ValueError):
                raise SpecError(f"{path}:{line}: Timestamp, Request tokens and Response tokens must be numbers") from None
            if req < 0 or resp < 0 or not np.isfinite(ts):
                raise SpecError(f"{path}:{line}: negative token count or non-finite timestamp")
            if skip_failed and resp == 0:
                continue
            rows.append((ts, (row.get("Model") or "").strip(), req, resp))
            if max_rows is not None and len(rows) >= max_rows:
                break
    if not rows:
        raise SpecError(f"{path}: no usable rows")
    rows.sort(key=lambda r: r[0])
    return rows


def load_workload(path: str | Path) -> Union[GammaWorkload, BurstGPTWorkload]:
    """A workload from a YAML file, or a BurstGPT CSV given directly (replayed as recorded)."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"{path}: no such file")
    if path.suffix.lower() == ".csv":
        return BurstGPTWorkload(path=path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise SpecError(f"{path}: YAML syntax error: {str(exc).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: expected a mapping with `kind: gamma` or `kind: burstgpt`")
    try:
        workload = _WORKLOAD.validate_python(raw)
    except ValidationError as exc:
        # the first loc element is the discriminator's tag ("gamma"), not a key of the file
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:]) or '(top level)'}: "
                             f"{e['msg'].removeprefix('Value error, ')}" for e in exc.errors())
        raise SpecError(f"{path}: {problems}") from None
    if isinstance(workload, BurstGPTWorkload) and not workload.path.is_absolute():
        workload = workload.model_copy(update={"path": path.resolve().parent / workload.path})
    return workload


def round_robin(variants: list[str], num_requests: int, prompt_tokens: int, output_tokens: int) -> list[Request]:
    """Fixed-length requests cycling over `variants`, all arriving at t=0: the request list of a
    closed-loop run (the clients pace themselves, so arrival times are not used).

    >>> [(r.variant, r.prompt_tokens) for r in round_robin(["a", "b"], 3, 8, 4)]
    [('a', 8), ('b', 8), ('a', 8)]
    """
    if not variants:
        raise SpecError("no variants to send requests to")
    if num_requests < 0 or prompt_tokens < 1 or output_tokens < 1:
        raise SpecError("round_robin needs num_requests >= 0 and token counts >= 1")
    return [Request(0.0, variants[i % len(variants)], prompt_tokens, output_tokens) for i in range(num_requests)]


def summarize(requests: list[Request]) -> dict[str, float]:
    """Offered load of a request list: count, duration, rate and mean lengths."""
    if not requests:
        return {"num_requests": 0, "duration_s": 0.0, "rate": 0.0, "mean_prompt": 0.0, "mean_output": 0.0}
    duration = requests[-1].arrival_s - requests[0].arrival_s
    return {
        "num_requests": len(requests),
        "duration_s": duration,
        "rate": (len(requests) - 1) / duration if duration > 0 else float("inf"),
        "mean_prompt": float(np.mean([r.prompt_tokens for r in requests])),
        "mean_output": float(np.mean([r.output_tokens for r in requests])),
    }
