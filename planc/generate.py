"""One request through one chain, without a server: the bundle's entry point and `planc run`.

This recomputes the whole sequence each step (no KV cache); the serving engine with
iteration-level batching and a paged KV cache is the job of `planc serve`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from planc.bundle import Bundle
from planc.models.tokenizer import load_tokenizer


@dataclass
class Completion:
    prompt_ids: list[int]
    output_ids: list[int]
    text: str
    finish_reason: str  # "stop" (an eos token) or "length"


def generate_ids(model: torch.nn.Module, prompt_ids: list[int], max_new_tokens: int, eos_ids: list[int],
                 temperature: float = 0.0, seed: Optional[int] = None) -> tuple[list[int], str]:
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    ids = list(prompt_ids)
    out: list[int] = []
    for _ in range(max_new_tokens):
        logits = model(torch.tensor([ids]))[0, -1].float()
        if temperature <= 0:
            token = int(torch.argmax(logits))
        else:
            probs = torch.softmax(logits / temperature, dim=-1)
            token = int(torch.multinomial(probs, 1, generator=gen))
        if token in eos_ids:
            return out, "stop"
        out.append(token)
        ids.append(token)
    return out, "length"


def complete(bundle: Bundle, variant: str, prompt: str, max_new_tokens: int = 32, temperature: float = 0.0,
             seed: Optional[int] = None) -> Completion:
    tok = load_tokenizer(bundle.tokenizer_dir(variant))
    prompt_ids = tok.encode(prompt).ids
    model = bundle.load_chain(variant)
    out, reason = generate_ids(model, prompt_ids, max_new_tokens, bundle.eos_token_ids(variant), temperature, seed)
    return Completion(prompt_ids, out, tok.decode(out), reason)
