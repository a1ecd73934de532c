"""Fit the runtime's fixed overheads (per step, block call, sequence and prefill token in a call) on this machine.

A small random Llama with the tiny example's shape is compiled into a bundle with four variants
(base, a partial fine-tune of the top layers and head, a full fine-tune, a LoRA adapter), so
steps differ in how many block calls they make as well as in how many sequences they carry. Its
steps are timed on planc's own engine, and the part of each step that the roofline does not
explain is fitted, by least squares, as step_us + block_call_us * calls + per_seq_us * sequences in
block calls + per_token_us * prefill tokens in block calls, where the calls are the batched block
calls, the adapter delta calls and the attention calls of one sequence (a prefill, or a lone decode),
exactly as the simulator counts them (`planc.simulate.step_time` is linear in the overheads, so
probing it with each one set to 1 us gives the counts). What is left over is measured against the
device's matmul table when the profile has one (else its roofline), so the fit and the simulator
agree on what the overheads are not. Counting an attention call of one sequence as a block call
halved the error against charging it per sequence; the per-prefill-token term halved it again
(benchmarks/RESULTS.md, "Simulator fidelity").
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from planc.cluster import DeviceProfile, Overheads
from planc.cost import CostModel

SHAPE = dict(vocab_size=512, hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, bos_token_id=0, eos_token_id=1, pad_token_id=2, max_position_embeddings=1024)
VARIANTS = ("base", "top", "full", "lora")
FITTED = ("step_us", "block_call_us", "per_seq_us", "per_token_us")
"""The Overheads fields fitted here (the server's are measured apart: planc.profile_server)."""


@dataclass
class Fit:
    overheads: Overheads
    num_steps: int
    """Measured step kinds (each the fastest of its repeats)."""
    rel_error: float
    """Median |predicted - measured| / measured over them, after the fit."""
    samples: list[tuple[str, float, float]]
    """(step kind, measured seconds, predicted seconds) of every measured step kind."""


def calibration_bundle(root: Path) -> Path:
    """Write the calibration checkpoints under `root` and compile them to `root/bundle`."""
    import planc
    from planc.example import corpus
    from planc.example.checkpoints import hf_config, perturb, random_state, top_layers, write_adapter, write_checkpoint
    from planc.example.tiny import TinyExample, train_tokenizer, write_tokenizer

    cfg = hf_config("llama", **SHAPE)
    state = random_state(cfg, seed=0)
    base = write_checkpoint(root / "base", cfg, state)
    write_tokenizer(train_tokenizer([corpus.general(200)], 300), base, TinyExample())
    write_checkpoint(root / "top", cfg, perturb(state, top_layers(SHAPE["num_hidden_layers"], 2), seed=1))
    write_checkpoint(root / "full", cfg, perturb(state, lambda _name: True, seed=2))
    write_adapter(root / "lora", cfg, targets=("q_proj", "v_proj"), rank=8, alpha=16.0, seed=3)
    spec = {"base": {"name": "base", "path": "./base"}, "backend": "local",
            "variants": [{"name": "top", "path": "./top"}, {"name": "full", "path": "./full"},
                         {"name": "lora", "adapter": "./lora"}]}
    (root / "model.yaml").write_text(json.dumps(spec) + "\n")
    out = root / "bundle"
    planc.emit(planc.compile(planc.load(root / "model.yaml")), out=out)
    return out


def batches(quick: bool) -> list[tuple[list[str], int]]:
    """(variant of each sequence, prompt tokens) per measured batch: sizes and mixes chosen so calls and
    sequences vary apart, at a short and a typical context (attention and KV reads grow with it)."""
    sizes = (1, 4, 16) if quick else (1, 2, 4, 8, 16)
    mixes = [("base",), VARIANTS, ("base", "full")]
    return [([mix[i % len(mix)] for i in range(n * len(mix))], ctx) for ctx in (16, 128) for mix in mixes
            for n in sizes if n * len(mix) <= 64]


def time_steps(engine, variants: list[str], prompt_len: int, decode_steps: int) -> list[tuple[list, float]]:
    """Time one batch of `variants` on `engine`: a prefill step, and the fastest of `decode_steps` decode
    steps. Returns (batch state before the step, seconds) for each, where a state lists (variant,
    tokens, cached) per sequence, as `planc.simulate.step_time` takes it.
    """
    from planc.runtime.sampling import SamplingParams

    rng = np.random.default_rng(len(variants))
    prompts = [[int(t) for t in rng.integers(3, 300, prompt_len)] for _ in variants]

    def submit(max_tokens: int) -> None:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        for v, prompt in zip(variants, prompts):
            engine.submit(v, prompt, params, lambda _event: None)

    submit(1)  # max_tokens 1: the batch ends with its prefill step
    prefill = _timed(engine.step)
    submit(decode_steps + 2)
    engine.step()
    engine.step()  # the first decode after a prefill runs with colder caches: not timed
    state = [(s.variant, len(s.all_ids), s.num_computed) for s in engine.running]
    decode = min(_timed(engine.step) for _ in range(decode_steps))
    while engine.has_work():
        engine.step()
    # contexts grow by a token per step (a few tokens change nothing here): the middle step stands for all
    mid = [(v, n + decode_steps // 2, c + decode_steps // 2) for v, n, c in state]
    return [([(v, prompt_len, 0) for v in variants], prefill), (mid, decode)]


def time_batches(engine, quick: bool, progress: Callable[[str], None]) -> list[tuple[str, list, float]]:
    """(label, state, seconds) of every batch's prefill and decode step, each the fastest over rounds.

    The rounds go over all batches in turn, so a burst of load from other processes spoils one
    round of each batch rather than every repeat of one; load only ever adds time, so the fastest
    round is the best estimate of the step itself.
    """
    best: dict[str, tuple[list, float]] = {}
    rounds = 2
    for r in range(rounds):
        progress(f"timing engine steps, round {r + 1} of {rounds}")
        for variants, prompt_len in batches(quick):
            for kind, (state, seconds) in zip(("prefill", "decode"), time_steps(engine, variants, prompt_len, 3)):
                label = f"{kind} {len(variants)} x {'+'.join(sorted(set(variants)))}, {prompt_len}-token prompts"
                if label not in best or seconds < best[label][1]:
                    best[label] = (state, seconds)
    return [(label, state, seconds) for label, (state, seconds) in best.items()]


def _timed(fn: Callable[[], object]) -> float:
    """CPU seconds of this thread (the engine steps in it): robust to other processes on the machine."""
    start = time.thread_time()
    fn()
    return time.thread_time() - start


def fit_overheads(device: DeviceProfile, bundle, quick: bool = False,
                  progress: Optional[Callable[[str], None]] = None) -> Fit:
    """Measure steps of the calibration bundle and fit `device`'s overheads to what its roofline leaves over."""
    from planc.sim_model import SimModel
    from planc.simulate import step_time

    model = SimModel.from_bundle(bundle)
    bare = device.model_copy(update={"overheads": Overheads()})
    probes = [CostModel(bare.model_copy(update={"overheads": Overheads(**{k: 1.0})}), 4) for k in FITTED]
    from planc.runtime.engine import Engine, EngineConfig

    engine = Engine(bundle, EngineConfig(kv_cache_bytes=32 * 2**20, max_running=256, max_batch_tokens=1 << 16))
    rows, targets, rooflines, labels = [], [], [], []
    for label, state, measured in time_batches(engine, quick, progress or (lambda _msg: None)):
        labels.append(label)
        roofline = step_time(model, CostModel(bare, 4), state)
        rows.append([(step_time(model, p, state) - roofline) * 1e6 for p in probes])
        targets.append((measured - roofline) * 1e6)
        rooflines.append(roofline * 1e6)
    a, y = np.asarray(rows), np.asarray(targets)
    coef = _nonnegative_lstsq(a, y)
    overheads = Overheads(**{k: round(float(c), 2) for k, c in zip(FITTED, coef)})
    # error on whole steps (roofline included): the figure that matters to the simulator
    roof = np.asarray(rooflines)
    predicted, measured = (a @ coef + roof) * 1e-6, (y + roof) * 1e-6
    error = np.abs(predicted - measured) / measured
    return Fit(overheads, len(y), float(np.median(error)), list(zip(labels, measured.tolist(), predicted.tolist())))


def _nonnegative_lstsq(a: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares with every coefficient >= 0 (an overhead cannot be negative): drop negatives and refit."""
    keep = list(range(a.shape[1]))
    coef = np.zeros(a.shape[1])
    while keep:
        sol, *_ = np.linalg.lstsq(a[:, keep], y, rcond=None)
        if (sol >= 0).all():
            coef[keep] = sol
            return coef
        keep.pop(int(np.argmin(sol)))
    return coef


def with_threads(fn: Callable, threads: int = 1):
    """Run `fn` with torch's intra-op threads set as the runtime uses them, then restore them."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)
