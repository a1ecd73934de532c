"""Fit the runtime's fixed overheads, and a scale on the matmul table, on a live run of planc's own engine.

Two small random Llamas are compiled into bundles: one with the tiny example's shape and four variants
(base, a partial fine-tune of the top layers and head, a full fine-tune, a LoRA adapter), so steps
differ in how many block calls they make as well as in how many sequences they carry, and a wider one
(base and a LoRA adapter) whose steps are mostly Linears. Each serves a short open-loop workload on
planc's engine in this process (bursty Gamma arrivals, mixed prompt and output lengths, chunked
prefill), as a real workload drives it, and every step is logged with the thread CPU time it took.

Fitting on live steps, not on repeated identical batches, is the point: the previous calibration
timed the fastest of repeated equal-context batches and fitted them within ~10%, yet the same kinds
of step in a live run took 25-40% longer (benchmarks/RESULTS.md, "Simulator fidelity"). A step's
time is predicted exactly as the simulator does (`planc.sim_step.StepModel` is linear in the
overheads and in the table's scale, so probing it with each set to 1 gives the counts), and
measured = roofline and table + (few - 1) * table Linears of <= SPLIT_ROWS rows + (many - 1) * larger
table Linears + step_us + block_call_us * calls + per_seq_us * sequences + per_token_us * prefill
tokens + decode_call_us * batched decode calls
is fitted by least absolute relative error (a median regression, robust to the steps a burst of
other load spoils), every overhead >= 0, then refitted by least squares on the steps that fit does
not find spoiled, so that the prediction is a step's mean time, not its median (`_trimmed_fit`).
Two table scales, because live decode-sized calls (which stream their weight from memory) run
~1.3-1.7x their isolated times while prefill-sized ones (compute-bound) run ~1.1-1.3x: with one scale
the wide model's prefill steps came out 17-21% slow in two calibration runs, with two within 4%.

>>> fit = fit_overheads(device, [Bundle.open(b) for b in bundles])   # doctest: +SKIP
"""
from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from planc.cluster import DeviceProfile, Overheads

SHAPE = dict(vocab_size=512, hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, bos_token_id=0, eos_token_id=1, pad_token_id=2, max_position_embeddings=1024)
WIDE_SHAPE = dict(SHAPE, hidden_size=768, intermediate_size=2048, num_attention_heads=12, num_key_value_heads=4)
"""Weights of ~9 MB per Linear, beyond the caches as a ~100M model's are."""
VARIANTS = ("base", "top", "full", "lora")
WIDE_VARIANTS = ("base", "lora")
FITTED = ("step_us", "block_call_us", "per_seq_us", "per_token_us", "decode_call_us")
"""The Overheads fields fitted here (the server's are measured apart: planc.profile_server)."""
LIVE = {"small": dict(rate=12.0, num_requests=160), "wide": dict(rate=2.0, num_requests=30)}
"""Per bundle: the live run's mean arrivals per second and requests (~15 s each here); quick: a quarter."""
MAX_BATCH_TOKENS = 256
SPLIT_ROWS = 32
"""Linear calls of at most this many rows (decodes and short prompt chunks: they stream their weight)
get the few-row table scale, calls of the table's next row count and more (compute-bound) the many-row
one; between the two the table's log interpolation blends them."""


TRIM_MADS, TRIM_FLOOR = 6.0, 0.5
"""Steps further off the median fit than this many robust standard deviations (and than 50%) are left out
of the final least-squares fit: a burst of other load, not the step's own cost."""


@dataclass
class Fit:
    overheads: Overheads
    table_scale: float
    """Live Linear time over the table's isolated calls of at most SPLIT_ROWS rows (1.0 where the profile has
    no table)."""
    many_row_scale: float
    """The same for calls of more rows (equal to table_scale where the fit uses one scale)."""
    num_steps: int
    """Logged live steps fitted on."""
    rel_error: float
    """Median |predicted - measured| / measured over them, after the fit."""
    samples: list[tuple[str, float, float]]
    """(bundle, measured seconds, predicted seconds) of every step."""


def calibration_bundle(root: Path, shape: Optional[dict] = None, variants: tuple[str, ...] = VARIANTS) -> Path:
    """Write the calibration checkpoints of `shape` (default SHAPE) under `root` and compile them to `root/bundle`."""
    import planc
    from planc.example import corpus
    from planc.example.checkpoints import hf_config, perturb, random_state, top_layers, write_adapter, write_checkpoint
    from planc.example.tiny import TinyExample, train_tokenizer, write_tokenizer

    shape = shape or SHAPE
    cfg = hf_config("llama", **shape)
    state = random_state(cfg, seed=0)
    base = write_checkpoint(root / "base", cfg, state)
    write_tokenizer(train_tokenizer([corpus.general(200)], 300), base, TinyExample())
    entries = []
    if "top" in variants:
        write_checkpoint(root / "top", cfg, perturb(state, top_layers(shape["num_hidden_layers"], 2), seed=1))
        entries.append({"name": "top", "path": "./top"})
    if "full" in variants:
        write_checkpoint(root / "full", cfg, perturb(state, lambda _name: True, seed=2))
        entries.append({"name": "full", "path": "./full"})
    if "lora" in variants:
        write_adapter(root / "lora", cfg, targets=("q_proj", "v_proj"), rank=8, alpha=16.0, seed=3)
        entries.append({"name": "lora", "adapter": "./lora"})
    spec = {"base": {"name": "base", "path": "./base"}, "backend": "local", "variants": entries}
    (root / "model.yaml").write_text(json.dumps(spec) + "\n")
    out = root / "bundle"
    planc.emit(planc.compile(planc.load(root / "model.yaml")), out=out)
    return out


def calibration_bundles(root: Path) -> list[Path]:
    """The small (four variants) and the wide (two) calibration bundles under `root`."""
    return [calibration_bundle(root / "small"), calibration_bundle(root / "wide", WIDE_SHAPE, WIDE_VARIANTS)]


def live_steps(bundle, rate: float, num_requests: int, seed: int = 0) -> list[tuple[list, float]]:
    """Serve a bursty open-loop workload on `bundle` with planc's engine in a thread of this process;
    (batch state, thread CPU seconds) of every step, where a state lists (variant, tokens, cached,
    tokens computed) per sequence in admission order, as `planc.simulate.step_time` takes it."""
    from planc.runtime.engine import Engine, EngineConfig
    from planc.runtime.sampling import SamplingParams
    from planc.workload import GammaWorkload

    work = GammaWorkload(seed=seed, rate=rate, cv=2.0, num_requests=num_requests,
                         prompt_tokens={"dist": "uniform", "low": 8, "high": 192},
                         output_tokens={"dist": "uniform", "low": 8, "high": 96}).requests(list(bundle.variants))
    engine = Engine(bundle, EngineConfig(kv_cache_bytes=64 * 2**20, max_batch_tokens=MAX_BATCH_TOKENS))
    log = _log_steps(engine)
    done, left = threading.Event(), [len(work)]

    def sink(event) -> None:
        if event.finished:
            left[0] -= 1
            if not left[0]:
                done.set()
    with engine.in_thread():
        rng, t0 = np.random.default_rng(seed), time.perf_counter()
        for r in work:
            time.sleep(max(0.0, t0 + r.arrival_s - time.perf_counter()))
            engine.submit(r.variant, [int(t) for t in rng.integers(3, 300, r.prompt_tokens)],
                          SamplingParams(max_tokens=r.output_tokens, temperature=0.0, ignore_eos=True), sink)
        done.wait(600)
    return log[1:]  # the first step pays code paths once


def _log_steps(engine) -> list[tuple[list, float]]:
    """Wrap `engine`'s instance methods (the runtime is not changed) to log each step's batch and CPU time."""
    log, batch = [], []
    forward, step = engine._forward, engine.step

    def logged_forward(work):
        batch[:] = [(s.variant, s.num_tokens, s.num_computed, s.scheduled) for s in work]
        return forward(work)

    def logged_step():
        batch.clear()
        start = time.thread_time()
        busy = step()
        if batch:
            log.append((list(batch), time.thread_time() - start))
        return busy
    engine._forward, engine.step = logged_forward, logged_step
    return log


def step_features(device: DeviceProfile, model, states: list[list]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per step: what the profile without overheads predicts (roofline and table, seconds), the table's
    Linears (seconds, one column for calls of at most SPLIT_ROWS rows and one for larger ones; 0 without
    a table), and one column of counts per FITTED overhead (us per us)."""
    from planc.cost import CostModel
    from planc.runtime.engine import EngineConfig
    from planc.sim_step import StepModel

    bare = device.model_copy(update={"overheads": Overheads()})
    cfg = EngineConfig(max_batch_tokens=MAX_BATCH_TOKENS)
    probes = [bare.model_copy(update={"overheads": Overheads(**{k: 1.0})}) for k in FITTED]
    table = bare.matmul_table
    if table is not None:
        probes += [bare.model_copy(update={"matmul_table": scaled_table(table, 2.0, 1.0)}),
                   bare.model_copy(update={"matmul_table": scaled_table(table, 1.0, 2.0)})]
    models = [StepModel(model, CostModel(d, 4), cfg) for d in [bare] + probes]
    index = {name: i for i, name in enumerate(model.variants)}
    base, cols = [], []
    for state in states:
        work = [_Work(index[v], cached, scheduled) for v, _total, cached, scheduled in state]
        times = [m.step_time(work) for m in models]
        base.append(times[0])
        cols.append([t - times[0] for t in times[1:]])
    cols_a = np.asarray(cols).reshape(len(states), len(models) - 1)
    linears = cols_a[:, len(FITTED):] if table is not None else np.zeros((len(states), 2))
    return np.asarray(base), linears, cols_a[:, :len(FITTED)] * 1e6


def scaled_table(table, few: float, many: float):
    """`table` with its times at up to SPLIT_ROWS rows multiplied by `few` and the rest by `many`."""
    split = sum(1 for r in table.rows if r <= SPLIT_ROWS)
    linears = [lin.model_copy(update={"us": [round(t * (few if i < split else many), 3) for i, t in enumerate(lin.us)]})
               for lin in table.linears]
    return table.model_copy(update={"linears": linears})


@dataclass
class _Work:
    variant: int
    computed: int
    scheduled: int


def fit_overheads(device: DeviceProfile, bundles: list, quick: bool = False,
                  progress: Optional[Callable[[str], None]] = None) -> Fit:
    """Run each bundle live and fit `device`'s overheads and table scale to its steps (see the module doc)."""
    from planc.sim_model import SimModel

    say = progress or (lambda _msg: None)
    base, table, counts, measured, names = [], [], [], [], []
    for bundle, name in zip(bundles, ("small", "wide")):
        live = LIVE[name]
        say(f"a live run of the {name} calibration model")
        steps = live_steps(bundle, live["rate"], max(8, live["num_requests"] // (4 if quick else 1)))
        b, t, c = step_features(device, SimModel.from_bundle(bundle), [s for s, _ in steps])
        base.append(b), table.append(t), counts.append(c)
        measured.append(np.array([sec for _, sec in steps]))
        names += [name] * len(steps)
    return fit_steps(device, np.concatenate(base), np.concatenate(table), np.concatenate(counts),
                     np.concatenate(measured), names)


def refit(device: DeviceProfile, bundles: list, quick: bool = False,
          progress: Optional[Callable[[str], None]] = None) -> tuple[DeviceProfile, Fit]:
    """`device` with its fitted overheads and table scales replaced by a new live fit (the server's terms
    and the table's measured times are kept): the quick way to re-profile a machine whose speed drifts,
    ~35 s (`quick` ~10 s) instead of `planc profile`'s ~3 min.

    >>> fresh, fit = refit(load_device("local"), [Bundle.open(b) for b in calibration_bundles(tmp)])  # doctest: +SKIP
    """
    table = device.matmul_table
    if table is not None:
        device = device.model_copy(update={"matmul_table": table.model_copy(update={"scale": 1.0})})
    fit = with_threads(lambda: fit_overheads(device, bundles, quick, progress))
    overheads = device.overheads.model_copy(update={k: getattr(fit.overheads, k) for k in FITTED})
    update = {"overheads": overheads}
    if table is not None:
        # the table's scale is the few-row one; the many-row calls' own scale relative to it goes into their times
        update["matmul_table"] = scaled_table(device.matmul_table, 1.0, fit.many_row_scale / fit.table_scale) \
            .model_copy(update={"scale": fit.table_scale})
    return device.model_copy(update=update), fit


def fit_steps(device: DeviceProfile, base: np.ndarray, table: np.ndarray, counts: np.ndarray, measured: np.ndarray,
              names: Optional[list[str]] = None, split: bool = True, mean: bool = True) -> Fit:
    """Fit overheads (us, >= 0) and the table's scales to `measured` step seconds (arrays as step_features';
    `table` one column, or few-row and many-row columns), minimizing the sum of |relative error|, then (`mean`)
    refitted by least squares on the steps that fit does not find spoiled (`_trimmed_fit`); `split` False
    fits one scale for both. Each scale's column enters twice, as +table and -table, so that it may
    go below 1 with every coefficient >= 0."""
    table = table.reshape(len(measured), -1)
    if not split or table.shape[1] == 1:
        table = table.sum(axis=1, keepdims=True)
    scales = np.column_stack([c for col in table.T for c in (col * 1e6, -col * 1e6)])
    a = np.column_stack([counts, scales])
    y = (measured - base) * 1e6
    coef = _median_fit(a, y, measured * 1e6)
    if mean:
        coef = _trimmed_fit(a, y, measured * 1e6, coef)
    fitted = [float(1.0 + coef[len(FITTED) + 2 * i] - coef[len(FITTED) + 2 * i + 1]) if table[:, i].any() else 1.0
              for i in range(table.shape[1])]
    overheads = Overheads(**{k: round(float(c), 2) for k, c in zip(FITTED, coef)})
    predicted = (a @ coef) * 1e-6 + base
    error = np.abs(predicted - measured) / measured
    return Fit(overheads, round(fitted[0], 4), round(fitted[-1], 4), len(y), float(np.median(error)),
               list(zip(names or ["?"] * len(y), measured.tolist(), predicted.tolist())))


def _median_fit(a: np.ndarray, y: np.ndarray, scale: np.ndarray, iterations: int = 30) -> np.ndarray:
    """Nonnegative coefficients minimizing sum |a @ c - y| / scale: iteratively reweighted least squares
    (each row weighted by 1 / (scale * |residual|)), starting from the relative least squares."""
    w = 1.0 / scale
    coef = np.zeros(a.shape[1])
    for _ in range(iterations):
        root = np.sqrt(w)
        coef = _nonnegative_lstsq(a * root[:, None], y * root)
        residual = np.abs(a @ coef - y)
        w = 1.0 / (scale * np.maximum(residual, 1e-3 * scale))
    return coef


def _trimmed_fit(a: np.ndarray, y: np.ndarray, scale: np.ndarray, coef: np.ndarray, floor: float = TRIM_FLOOR) -> np.ndarray:
    """Nonnegative least squares of the relative error over the steps the median fit `coef` predicts within
    TRIM_MADS robust deviations (at least `floor`): the mean of the usual steps, not the median. A step's
    time is skewed (some are 10-50% slower than the typical one: the VM, the allocator, the collector),
    and the simulator needs the mean: a request's TPOT and the engine's throughput are sums of steps. The
    median fit alone came out 4-11% under the calibration runs' total time."""
    # relative to the median fit's prediction, not to the measurement: dividing by the noisy measured time
    # would favour the fast steps and fit below the mean again
    predicted = a @ coef - y + scale
    rel = (scale - predicted) / predicted
    spread = 1.4826 * np.median(np.abs(rel - np.median(rel)))
    keep = np.abs(rel) <= max(TRIM_MADS * spread, floor)
    w = 1.0 / predicted[keep]
    return _nonnegative_lstsq(a[keep] * w[:, None], y[keep] * w)


def _nonnegative_lstsq(a: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares with every coefficient >= 0 (an overhead cannot be negative): drop negatives and refit."""
    keep = [i for i in range(a.shape[1]) if a[:, i].any()]
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
