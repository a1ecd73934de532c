"""What one `planc bench` run does: the target, the load shape, the request form and the caps.

Every run is bounded: `max_requests` and `duration_s` always have finite values, and each request
has its own timeout, so a run ends by itself at most `duration_s + request_timeout_s` after it starts.
"""
from __future__ import annotations

import os
import re
from typing import Literal, Mapping, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from planc.errors import PlancError

_TENANT = re.compile(r"^(?P<name>[A-Za-z0-9._-]+)=(?P<env>[A-Za-z_][A-Za-z0-9_]*)?(?::(?P<variants>.*))?$")


class Tenant(BaseModel):
    """A client identity: the API key it sends (read from an environment variable, never given on
    the command line, as model.yaml's tenants do) and the variants its requests go to."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    api_key_env: Optional[str] = None
    """Environment variable holding the key; None sends no Authorization header."""
    variants: Optional[tuple[str, ...]] = None
    """Variants this tenant sends requests for; None = any variant."""

    def api_key(self, environ: Mapping[str, str] = os.environ) -> Optional[str]:
        if self.api_key_env is None:
            return None
        key = environ.get(self.api_key_env)
        if not key:
            raise PlancError(f"--tenant {self.name}: environment variable {self.api_key_env} (its API key) is not set")
        return key

    def sends(self, variant: str) -> bool:
        return self.variants is None or variant in self.variants


def parse_tenant(text: str) -> Tenant:
    """`NAME=ENVVAR[:v1,v2]`; ENVVAR may be empty (no key), no variant list means any variant.

    >>> parse_tenant("acme=ACME_KEY:legal,chat")
    Tenant(name='acme', api_key_env='ACME_KEY', variants=('legal', 'chat'))
    """
    m = _TENANT.match(text.strip())
    if not m:
        raise PlancError(f"--tenant {text!r}: expected NAME=ENVVAR[:variant1,variant2] (the key is read from ENVVAR)")
    variants = m.group("variants")
    names = tuple(v.strip() for v in variants.split(",") if v.strip()) if variants else None
    return Tenant(name=m.group("name"), api_key_env=m.group("env"), variants=names or None)


def parse_pairs(items: list[str], flag: str, number: bool = False) -> dict:
    """`KEY=VALUE` options (repeated or comma-separated) as a dict."""
    out: dict = {}
    for item in (part for text in items for part in text.split(",") if part.strip()):
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise PlancError(f"{flag} {item!r}: expected KEY=VALUE")
        try:
            out[key.strip()] = float(value) if number else value.strip()
        except ValueError:
            raise PlancError(f"{flag} {item!r}: {value!r} is not a number") from None
    return out


class BenchConfig(BaseModel):
    """One run. The CLI builds it from its flags; library users (benchmarks/serve_load.py) build it directly."""

    model_config = ConfigDict(extra="forbid")
    url: str
    """Base URL of an OpenAI-compatible server (without /v1)."""
    mode: Literal["open", "closed"] = "open"
    """open: send each request at its arrival time; closed: `concurrency` clients, each sending its
    next request when its previous one ends (arrival times are ignored)."""
    concurrency: int = Field(1, ge=1, le=4096)
    max_requests: int = Field(1000, ge=1, le=1_000_000)
    """Requests sent at most; the rest of the workload is counted as not sent."""
    duration_s: float = Field(600.0, gt=0, le=86_400)
    """No request starts after this many seconds."""
    request_timeout_s: float = Field(120.0, gt=0)
    """A request not finished after this long is cancelled and counted as a timeout."""
    max_connections: int = Field(256, ge=1, le=65_536)
    """Open connections at most; open-loop requests beyond it wait in the client (reported as `pending`)."""
    endpoint: Literal["completions", "chat"] = "completions"
    prompt: Literal["auto", "ids", "text"] = "auto"
    """ids: token-id prompts of the exact length; text: words (about one token each); auto: ids if
    the server accepts them (one probe request), else text. Chat always sends text."""
    token_id_range: tuple[int, int] = (3, 500)
    """Token ids of generated prompts are drawn from [low, high): valid in most vocabularies, no specials."""
    ignore_eos: bool = True
    """Send `ignore_eos` (vLLM's extension, planc supports it) so outputs have exactly max_tokens tokens."""
    temperature: float = Field(0.0, ge=0, le=2)
    tenants: list[Tenant] = Field(default_factory=list)
    slo_ttft_ms: Optional[float] = Field(None, gt=0)
    slo_tpot_ms: Optional[float] = Field(None, gt=0)
    sample_interval_s: float = Field(0.5, gt=0)
    """How often in-flight counts (and the server's queue, when it exports one) are sampled."""
    scrape_metrics: bool = True
    """Sample the server's queue gauges from its /metrics (planc's or vLLM's names); each scrape costs
    the server a few ms, so throughput benchmarks may turn it off."""
    scrape_interval_s: float = Field(2.0, gt=0)
    """How often /metrics is scraped (at most once per sample): rendering it holds a Python server's
    GIL for 10-30 ms here, which a scrape every sample would add to the latencies being measured."""
    warmup: int = Field(0, ge=0, le=1000)
    """Untimed requests sent first, one variant after another (not part of the result)."""
    seed: int = 0
    label: Optional[str] = None
    """Name of this run in reports and --compare (default: the URL or bundle)."""

    @model_validator(mode="after")
    def _check(self) -> "BenchConfig":
        if not re.match(r"^https?://", self.url):
            raise ValueError(f"url {self.url!r} must start with http:// or https://")
        low, high = self.token_id_range
        if not 0 <= low < high:
            raise ValueError(f"token_id_range {self.token_id_range} must be 0 <= low < high")
        names = [t.name for t in self.tenants]
        if len(set(names)) != len(names):
            raise ValueError(f"tenant names repeat: {names}")
        return self


def make_config(**fields) -> BenchConfig:
    """BenchConfig with a pydantic error turned into one line naming the field."""
    try:
        return BenchConfig(**fields)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: " * bool(e["loc"])
                             + e["msg"].removeprefix("Value error, ") for e in exc.errors())
        raise PlancError(f"bench settings: {problems}") from None

