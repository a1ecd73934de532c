"""Architecture read from an HF config.json: every field that changes the math, nothing else.

planc supports the Llama family (llama, mistral, qwen2). Fields that change the output and that
planc does not implement are refused with a message naming the file and field, never ignored.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from planc.errors import CheckpointError
from planc.jsonfile import read_json_object

SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding settings, normalised from the old (`rope_theta` + `rope_scaling`) and the
    new (`rope_parameters`) spellings of config.json."""

    rope_type: str = "default"
    theta: float = 10000.0
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 0
    attention_factor: Optional[float] = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: Optional[float] = None
    mscale_all_dim: Optional[float] = None
    truncate: bool = True

    def inv_freq(self, head_dim: int) -> tuple[torch.Tensor, float]:
        """Inverse frequencies (head_dim/2,) in fp32 on the CPU, and the scale applied to cos/sin."""
        with torch.device("cpu"):  # real values even while a model is built on the meta device
            return self._inv_freq(head_dim)

    def _inv_freq(self, head_dim: int) -> tuple[torch.Tensor, float]:
        exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
        base_freq = 1.0 / (self.theta ** exponents)
        if self.rope_type == "default":
            return base_freq, 1.0
        if self.rope_type == "linear":
            return base_freq / self.factor, 1.0
        if self.rope_type == "llama3":
            return self._llama3(base_freq), 1.0
        if self.rope_type == "yarn":
            return self._yarn(head_dim)
        raise AssertionError(self.rope_type)

    def _llama3(self, inv_freq: torch.Tensor) -> torch.Tensor:
        old_len = self.original_max_position_embeddings
        low_wavelen = old_len / self.low_freq_factor
        high_wavelen = old_len / self.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / self.factor, inv_freq)
        smooth = (old_len / wavelen - self.low_freq_factor) / (self.high_freq_factor - self.low_freq_factor)
        smoothed = (1 - smooth) * scaled / self.factor + smooth * scaled
        is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(is_medium, smoothed, scaled)

    def _yarn(self, dim: int) -> tuple[torch.Tensor, float]:
        def mscale_of(scale: float, m: float = 1.0) -> float:
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        attention_factor = self.attention_factor
        if attention_factor is None:
            if self.mscale and self.mscale_all_dim:
                attention_factor = mscale_of(self.factor, self.mscale) / mscale_of(self.factor, self.mscale_all_dim)
            else:
                attention_factor = mscale_of(self.factor)

        def correction_dim(rotations: float) -> float:
            return (dim * math.log(self.original_max_position_embeddings / (rotations * 2 * math.pi))) / (
                2 * math.log(self.theta))

        low, high = correction_dim(self.beta_fast), correction_dim(self.beta_slow)
        if self.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001
        pos_freqs = self.theta ** (torch.arange(0, dim, 2, device="cpu").float() / dim)
        extrapolation = 1.0 / pos_freqs
        interpolation = 1.0 / (self.factor * pos_freqs)
        ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
        keep = 1 - ramp
        return interpolation * (1 - keep) + extrapolation * keep, float(attention_factor)


# Fields that do not change the math (a fine-tune may raise its context length, or untie its head).
_NOT_MATH = {"dtype", "max_position_embeddings", "tie_word_embeddings"}

# ArchConfig field -> the config.json key a user would look for.
_CONFIG_KEYS = {"family": "model_type", "num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
                "num_kv_heads": "num_key_value_heads", "rope": "rope settings", "qkv_bias": "attention_bias (q/k/v)",
                "o_bias": "attention_bias (o_proj)", "sliding_windows": "sliding_window"}


@dataclass(frozen=True)
class ArchConfig:
    """The architecture of one Llama-family checkpoint. Equal ArchConfigs trace to equal graphs."""

    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: RopeConfig
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    sliding_windows: tuple[Optional[int], ...]
    """Per layer: the attention window, or None for full causal attention."""
    max_position_embeddings: int
    dtype: str = "float32"
    """Dtype the checkpoint was saved in (informational; blocks keep the stored dtype)."""

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    def tensor_parallel_misfit(self, size: int) -> Optional[str]:
        """Why tensor parallelism of degree `size` cannot split this architecture (the config.json field it
        does not divide), or None when it can: each rank takes whole attention heads and KV heads, and an
        equal part of the MLP.

        >>> arch = parse_arch({"model_type": "llama", "vocab_size": 8, "hidden_size": 56, "intermediate_size": 64,
        ...                    "num_hidden_layers": 1, "num_attention_heads": 28, "num_key_value_heads": 4}, "c")
        >>> arch.tensor_parallel_misfit(4), arch.tensor_parallel_misfit(8)
        (None, "config.json's num_attention_heads (28) is not a multiple of 8")
        """
        for name, value in (("num_attention_heads", self.num_heads), ("num_key_value_heads", self.num_kv_heads),
                            ("intermediate_size", self.intermediate_size)):
            if value % size:
                return f"config.json's {name} ({value}) is not a multiple of {size}"
        return None

    @property
    def dtype_bytes(self) -> int:
        return self.torch_dtype.itemsize

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "ArchConfig":
        data = dict(data)
        data["rope"] = RopeConfig(**data["rope"])
        data["sliding_windows"] = tuple(data["sliding_windows"])
        return cls(**data)

    def differences(self, other: "ArchConfig") -> list[str]:
        """Fields that change the math and differ, as `config.json key: a vs b` (see _NOT_MATH)."""
        out = []
        for f in dataclasses.fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if f.name in _NOT_MATH:
                continue
            if a == b or (f.name == "sliding_windows" and self.num_layers != other.num_layers):
                continue
            if f.name == "rope":
                out += [f"rope {g.name} {getattr(a, g.name)} vs {getattr(b, g.name)}" for g in dataclasses.fields(a)
                        if getattr(a, g.name) != getattr(b, g.name)]
            else:
                out.append(f"{_CONFIG_KEYS.get(f.name, f.name)} {a} vs {b}")
        return out


@dataclass(frozen=True)
class GenerationIds:
    """Special token ids that change how generation stops (from config.json / generation_config.json)."""

    bos_token_id: Optional[int] = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    pad_token_id: Optional[int] = None


def read_config_json(path: Path) -> dict[str, Any]:
    return read_json_object(path, missing=f"{path}: no such file (an HF checkpoint directory needs config.json)")


def _positive_int(data: dict[str, Any], key: str, where: str, default: Optional[int] = None) -> int:
    value = data.get(key)
    if value is None:
        if default is None:
            raise CheckpointError(f"{where}: missing field `{key}`")
        return default
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise CheckpointError(f"{where}: field `{key}` must be a positive integer, got {value!r}")
    return value


def _positive_float(data: dict[str, Any], key: str, where: str, default: float) -> float:
    value = data.get(key, default)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
        raise CheckpointError(f"{where}: field `{key}` must be a positive number, got {value!r}")
    return float(value)


def parse_arch(data: dict[str, Any], where: str) -> ArchConfig:
    """Normalise an HF config.json dict; `where` (the file) prefixes every error."""
    family = data.get("model_type")
    if family not in SUPPORTED_FAMILIES:
        raise CheckpointError(
            f"{where}: model_type {family!r} is not supported (supported: {', '.join(SUPPORTED_FAMILIES)})")
    hidden = _positive_int(data, "hidden_size", where)
    heads = _positive_int(data, "num_attention_heads", where)
    kv_heads = _positive_int(data, "num_key_value_heads", where, default=heads)
    if heads % kv_heads:
        raise CheckpointError(f"{where}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
    if data.get("head_dim") is None and hidden % heads:
        raise CheckpointError(f"{where}: hidden_size {hidden} is not divisible by num_attention_heads {heads}")
    head_dim = _positive_int(data, "head_dim", where, default=hidden // heads)
    act = data.get("hidden_act", data.get("hidden_activation", "silu"))
    if act != "silu":
        raise CheckpointError(f"{where}: hidden_act {act!r} is not supported (only 'silu')")
    _refuse(data, where)
    num_layers = _positive_int(data, "num_hidden_layers", where)
    max_pos = _positive_int(data, "max_position_embeddings", where, default=2048)
    dtype = str(data.get("dtype") or data.get("torch_dtype") or "float32").removeprefix("torch.")
    if dtype not in _DTYPES:
        raise CheckpointError(f"{where}: dtype {dtype!r} is not supported (float32, float16, bfloat16)")
    return ArchConfig(
        family=family,
        vocab_size=_positive_int(data, "vocab_size", where),
        hidden_size=hidden,
        intermediate_size=_positive_int(data, "intermediate_size", where),
        num_layers=num_layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=_positive_float(data, "rms_norm_eps", where, 1e-6),
        rope=_parse_rope(data, where, max_pos),
        tie_word_embeddings=bool(data.get("tie_word_embeddings", False)),  # False in all three families
        # Qwen2 always has q/k/v biases; Mistral never has attention biases; Llama has `attention_bias`.
        qkv_bias=True if family == "qwen2" else (family == "llama" and bool(data.get("attention_bias", False))),
        o_bias=family == "llama" and bool(data.get("attention_bias", False)),
        mlp_bias=bool(data.get("mlp_bias", False)) if family == "llama" else False,
        sliding_windows=_parse_windows(data, where, family, num_layers),
        max_position_embeddings=max_pos,
        dtype=dtype,
    )


def _refuse(data: dict[str, Any], where: str) -> None:
    """Fields that change the math in ways planc does not implement."""
    prf = data.get("partial_rotary_factor")
    if prf not in (None, 1, 1.0):
        raise CheckpointError(f"{where}: partial_rotary_factor {prf} is not supported (only 1.0)")
    for key in ("attn_logit_softcapping", "final_logit_softcapping", "qk_layernorm", "use_qk_norm"):
        if data.get(key):
            raise CheckpointError(f"{where}: `{key}` is not supported by the {data['model_type']} family loader")
    if data.get("quantization_config"):
        raise CheckpointError(f"{where}: quantized checkpoints (quantization_config) are not supported")


def _parse_rope(data: dict[str, Any], where: str, max_pos: int) -> RopeConfig:
    # New spelling (transformers >= 5): rope_parameters = {rope_type, rope_theta, ...}.
    # Old spelling: top-level rope_theta plus an optional rope_scaling = {type|rope_type, factor, ...}.
    raw = data.get("rope_parameters") or data.get("rope_scaling") or {}
    key = "rope_parameters" if data.get("rope_parameters") else "rope_scaling"
    if not isinstance(raw, dict):
        raise CheckpointError(f"{where}: `{key}` must be a mapping, got {raw!r}")
    params = dict(raw)
    if any(isinstance(v, dict) for v in params.values()):
        raise CheckpointError(f"{where}: per-layer-type rope_parameters are not supported")
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise CheckpointError(
            f"{where}: rope type {rope_type!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
    merged = {"rope_theta": data.get("rope_theta", 10000.0), **params}
    theta = _positive_float(merged, "rope_theta", where, 10000.0)
    scaled = rope_type in ("llama3", "yarn")
    # Only llama3 and yarn read the pre-training length; for default/linear it must not make two
    # configs differ (long-context fine-tunes raise max_position_embeddings and change nothing else).
    original = 0
    if scaled:
        original = _positive_int({"o": params.get("original_max_position_embeddings")
                                  or data.get("original_max_position_embeddings") or max_pos}, "o", where)
    default_factor = max_pos / original if rope_type == "yarn" else 1.0
    num = {k: _positive_float(params, k, where, d) for k, d in (
        ("factor", default_factor), ("low_freq_factor", 1.0), ("high_freq_factor", 4.0))}
    for k in ("attention_factor", "mscale", "mscale_all_dim", "beta_fast", "beta_slow"):
        if params.get(k) is not None:
            _positive_float(params, k, where, 1.0)
    return RopeConfig(
        rope_type=rope_type, theta=theta, factor=num["factor"] if rope_type != "default" else 1.0,
        low_freq_factor=num["low_freq_factor"], high_freq_factor=num["high_freq_factor"],
        original_max_position_embeddings=original, attention_factor=params.get("attention_factor"),
        beta_fast=float(params.get("beta_fast") or 32), beta_slow=float(params.get("beta_slow") or 1),
        mscale=params.get("mscale"), mscale_all_dim=params.get("mscale_all_dim"),
        truncate=bool(params.get("truncate", True)))


_QWEN2_MAX_WINDOW_LAYERS = 28  # Qwen2Config's default
_MISTRAL_SLIDING_WINDOW = 4096  # MistralConfig's default when the key is absent


def _parse_windows(data: dict[str, Any], where: str, family: str, num_layers: int) -> tuple[Optional[int], ...]:
    default = _MISTRAL_SLIDING_WINDOW if family == "mistral" else None
    window = data.get("sliding_window", default)
    if window is not None:
        window = _positive_int({"sliding_window": window}, "sliding_window", where)
    layer_types = data.get("layer_types")
    if layer_types is not None:
        if not isinstance(layer_types, list) or len(layer_types) != num_layers:
            raise CheckpointError(f"{where}: `layer_types` must be a list of {num_layers} entries (one per layer)")
        unknown = set(map(str, layer_types)) - {"full_attention", "sliding_attention"}
        if unknown:
            raise CheckpointError(f"{where}: layer_types {sorted(unknown)} are not supported")
        if "sliding_attention" in layer_types and not window:
            raise CheckpointError(f"{where}: layer_types has sliding_attention but sliding_window is not set")
        return tuple(window if t == "sliding_attention" else None for t in layer_types)
    if family == "mistral":
        return tuple([window] * num_layers)
    if family == "qwen2" and data.get("use_sliding_window") and window:
        first = data.get("max_window_layers", _QWEN2_MAX_WINDOW_LAYERS)
        if not isinstance(first, int) or isinstance(first, bool) or first < 0:
            raise CheckpointError(f"{where}: `max_window_layers` must be a non-negative integer, got {first!r}")
        return tuple(window if i >= first else None for i in range(num_layers))
    return tuple([None] * num_layers)


def generation_ids(checkpoint_dir: Path, config: dict[str, Any]) -> GenerationIds:
    """bos/eos/pad ids; generation_config.json (when present) overrides config.json, as in transformers."""
    merged = dict(config)
    gen = checkpoint_dir / "generation_config.json"
    if gen.is_file():
        merged.update({k: v for k, v in read_json_object(gen).items() if v is not None})
    where = gen if gen.is_file() else checkpoint_dir / "config.json"

    def token_id(key: str, value: Any) -> Optional[int]:
        if value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
            return value
        raise CheckpointError(f"{where}: `{key}` must be a token id (a non-negative integer), got {value!r}")

    eos = merged.get("eos_token_id")
    eos_ids = tuple(token_id("eos_token_id", e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None)
    return GenerationIds(token_id("bos_token_id", merged.get("bos_token_id")), eos_ids,
                         token_id("pad_token_id", merged.get("pad_token_id")))
