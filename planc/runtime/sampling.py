"""Sampling parameters of one request and the per-sequence sampler."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    """0 = no top-k cut."""
    seed: Optional[int] = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False

    def validate(self) -> Optional[str]:
        """An error message for invalid values, or None."""
        if self.max_tokens < 1:
            return "max_tokens must be at least 1"
        if not 0.0 <= self.temperature <= 2.0:
            return "temperature must be between 0 and 2"
        if not 0.0 < self.top_p <= 1.0:
            return "top_p must be in (0, 1]"
        if self.top_k < 0:
            return "top_k must be 0 (off) or positive"
        if len(self.stop) > 4 or any(not isinstance(s, str) or not s for s in self.stop):
            return "stop must be a non-empty string or a list of at most 4 non-empty strings"
        return None


class Sampler:
    """Draws tokens for one sequence; seeded sequences are reproducible whatever they are batched with."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self.generator = torch.Generator()
        self.generator.manual_seed(params.seed if params.seed is not None else int(torch.randint(0, 2**62, ())))

    def __call__(self, logits: torch.Tensor) -> int:
        p = self.params
        logits = logits.float()
        if p.temperature == 0.0:
            return int(torch.argmax(logits))
        logits = logits / p.temperature
        if p.top_k:
            kth = torch.topk(logits, min(p.top_k, logits.numel())).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if p.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            keep = torch.cumsum(sorted_probs, 0) - sorted_probs < p.top_p  # always keeps the top token
            probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
        return int(torch.multinomial(probs, 1, generator=self.generator))
