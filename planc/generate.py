"""One request without a server: the bundle's entry point and `planc run`.

`complete` runs the request through the serving engine; `generate_ids` is the plain reference
(the whole sequence recomputed at every step, no KV cache) that tests compare the engine with.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from planc.bundle import Bundle
from planc.errors import PlancError
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
    """One request through the serving engine (paged KV cache, the variant's chain), without HTTP."""
    from planc.runtime.engine import Engine, EngineConfig
    from planc.runtime.sampling import SamplingParams

    tok = load_tokenizer(bundle.tokenizer_dir(variant))
    prompt_ids = tok.encode(prompt).ids
    if not prompt_ids:
        raise PlancError("--prompt: the prompt encodes to no tokens (this tokenizer adds no BOS); give some text")
    engine = Engine(bundle, EngineConfig(kv_cache_bytes=16 * 2**20, max_model_len=len(prompt_ids) + max_new_tokens))
    events = []
    engine.submit(variant, prompt_ids, SamplingParams(max_tokens=max_new_tokens, temperature=temperature, seed=seed),
                  events.append)
    while engine.has_work():
        engine.step()
    out = [e.token_id for e in events if e.token_id is not None]
    reason = events[-1].finish_reason or "stop"
    return Completion(prompt_ids, out, tok.decode(out), reason)
