"""Calibrate the shipped GPU profiles against measured timings (Vidur's, MIT; see the data README).

Compute: the linear part of one decoder-layer shard (fused QKV + output projection + gate/up + down,
the sum of the four operators' median times) per num_tokens and TP degree, against CostModel's
roofline for the same four Linears. `matmul_efficiency` is fitted on the compute-bound rows
(num_tokens >= 4x the ridge point) and `bw_efficiency` on the weight-bound rows (<= 1/8 of it), each
as the least-squares fit of the log error (a geometric mean), every (model, TP) group weighted alike.
The rows near the ridge fit neither: a sharp max() of two terms cannot follow the measured curve
there, and letting them pull the fit would make decode (weight-bound) predictions wrong by half.

Network: CostModel.allreduce_time (ring over links.intra_node_gbps plus latency_us per ring step)
against all_reduce.csv inside one node (2, 4, 8 GPUs, 2 KB to 64 MB). `nvlink_gbps` (what a named
cluster uses as intra_node_gbps) is fitted with the latency that named clusters use (Links' default),
least squares on the log error over all sizes.

    python benchmarks/calibrate_gpu_profiles.py [--data DIR] [--write] [--extract tests/data/gpu-profiles]

--write rewrites the calibrated keys of planc/profiles/{H100-80GB,A100-80GB,H200}.yaml;
--extract writes the small subset that tests/test_cost_calibration.py reads (with the licence).
"""
from __future__ import annotations

import argparse
import datetime
import math
import re
import statistics
import textwrap
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path

from gpu_timings import (CollectiveRow, LayerRow, nearest_sizes, read_allreduce_rows, read_layer_rows,
                         read_sendrecv_rows, write_extract)
from planc.cluster import DeviceProfile, Links, Overheads, load_device
from planc.cost import BlockCost, CostModel, arch_block_costs
from planc.models.config import parse_arch

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "gpu-profiles"
PROFILE_DIR = REPO / "planc" / "profiles"
GPUS = {"h100": "H100-80GB", "a100": "A100-80GB"}
INHERITS = {"H200": "H100-80GB"}
"""Profiles with no rows of their own: same Hopper SMs and NVLink 4 / NVSwitch as H100."""
COMPUTE_BOUND, WEIGHT_BOUND = 4.0, 1 / 8
"""Row selection for the two fits, as multiples of the ridge point (num_tokens where the roofline's
compute and weight-streaming times are equal at datasheet peak)."""
REPORT_TOKENS = (1, 8, 32, 64, 128, 256, 512, 1024, 2048, 4096, 16384, 32768)
REPORT_SIZES = (2**11, 2**16, 2**18, 2**20, 2**22, 2**24, 2**26)
TP_DEGREES = (1, 2, 4, 8)


def linear_part(shape: tuple[int, int, int, int, int]) -> BlockCost:
    """The traced decoder layer reduced to what Vidur timed: its four projections and their weights."""
    heads, kv_heads, hidden, expanded, vocab = shape
    arch = parse_arch({"model_type": "llama", "num_attention_heads": heads, "num_key_value_heads": kv_heads,
                       "hidden_size": hidden, "intermediate_size": expanded, "vocab_size": vocab,
                       "num_hidden_layers": 1}, f"shape {shape}")
    layer = arch_block_costs(arch, 2)["layer.0"]
    # Each Linear costs 2*in*out FLOPs per token and holds in*out weights (no biases), of 2 bytes in fp16.
    return replace(layer, attn_flops_per_pair=0.0, kv_bytes_per_token=0.0, act_bytes_per_token=0.0,
                   weight_bytes=layer.linear_flops_per_token / 2 * 2, num_allreduce=0)


def kernel_model(device: DeviceProfile) -> CostModel:
    """CostModel of the kernels alone: the profile's overheads are planc's host-side costs, which
    per-kernel CUDA timings do not contain."""
    return CostModel(device.model_copy(update={"overheads": Overheads()}), 2, "fp16")


def predict_layer(cm: CostModel, row: LayerRow) -> float:
    return cm.block_time(linear_part(row.shape), row.tp, prefill_tokens=row.num_tokens, attn_pairs=0.0)


def roofline_terms(device: DeviceProfile, row: LayerRow) -> tuple[float, float]:
    """(compute, weight-streaming) seconds at 100% of datasheet peak and bandwidth: the two terms of
    CostModel.block_time's max() for this block (check_terms holds the two to each other)."""
    cost = linear_part(row.shape)
    return (row.num_tokens * cost.linear_flops_per_token / (row.tp * device.flops("fp16")),
            cost.weight_bytes / (row.tp * device.mem_bw_gbps * 1e9))


def check_terms(device: DeviceProfile, rows: list[LayerRow]) -> None:
    """The fits divide roofline_terms by the efficiencies; the tables call CostModel. They must agree."""
    cm = kernel_model(device)
    for row in rows:
        c, m = roofline_terms(device, row)
        expected = max(c / device.matmul_efficiency, m / device.bw_efficiency)
        assert math.isclose(predict_layer(cm, row), expected, rel_tol=1e-9), (row, expected)


def group_geomean(pairs: list[tuple[tuple, float]]) -> float:
    """exp(mean log) per group, then over groups: every (model, TP) counts once however many rows."""
    groups = defaultdict(list)
    for key, value in pairs:
        groups[key].append(math.log(value))
    return math.exp(statistics.fmean(statistics.fmean(v) for v in groups.values()))


@dataclass(frozen=True)
class ComputeFit:
    matmul_efficiency: float
    bw_efficiency: float
    num_compute: int
    num_weight: int
    ridge: float
    """num_tokens where datasheet compute time equals weight-streaming time (the same for every shape:
    a Linear does 1 FLOP per weight byte per token in fp16)."""
    bw_by_tp: dict[int, float]


def ridge_tokens(device: DeviceProfile, row: LayerRow) -> float:
    c, m = roofline_terms(device, row)
    return row.num_tokens * m / c


def regime(device: DeviceProfile, row: LayerRow) -> str:
    ridge = ridge_tokens(device, row)
    if row.num_tokens >= COMPUTE_BOUND * ridge:
        return "compute-bound"
    return "weight-bound" if row.num_tokens <= WEIGHT_BOUND * ridge else "near the ridge"


def fit_efficiencies(device: DeviceProfile, rows: list[LayerRow]) -> ComputeFit:
    compute, weight = [], []
    for row in rows:
        c, m = roofline_terms(device, row)
        part = regime(device, row)
        if part == "compute-bound":
            compute.append(((row.model, row.tp), c / row.seconds))
        elif part == "weight-bound":
            weight.append(((row.model, row.tp), m / row.seconds))
    by_tp = {t: group_geomean([(k, v) for k, v in weight if k[1] == t]) for t in TP_DEGREES}
    return ComputeFit(group_geomean(compute), group_geomean(weight), len(compute), len(weight),
                      ridge_tokens(device, rows[0]), by_tp)


def predict_allreduce(device: DeviceProfile, links: Links, num_workers: int, size: int) -> float:
    one = BlockCost("layer", 0.0, hidden_size=size // 2, num_allreduce=1)  # tokens * hidden * 2 bytes = size
    return CostModel(device, 2, links=links).allreduce_time(one, num_workers, tokens=1)


def predict_transfer(device: DeviceProfile, links: Links, size: int) -> float:
    return CostModel(device, 2, links=links).transfer_time(tokens=1, hidden_size=size // 2)


def error_stats(errors: list[float]) -> str:
    a = sorted(abs(e) for e in errors)
    p90 = a[min(len(a) - 1, int(0.9 * len(a)))]
    return (f"{len(a)} rows, median |err| {statistics.median(a):.1%}, p90 {p90:.1%}, worst {a[-1]:.1%}, "
            f"median signed {statistics.median(errors):+.1%}")


def signed(e: float) -> str:
    return f"{e:+.0%}".replace("-", "−")


def layer_table(gpu: str, model: str, before: CostModel, after: CostModel, rows: list[LayerRow]) -> list[str]:
    """Markdown: per num_tokens and TP, measured µs and the error before -> after calibration."""
    by_key = {(r.num_tokens, r.tp): r for r in rows if r.model == model}
    out = [f"**{GPUS[gpu]}, {model}**: linear part of one layer shard, measured µs: error before → after",
           "", "| num_tokens | " + " | ".join(f"TP {t}" for t in TP_DEGREES) + " |",
           "|---:|" + "---|" * len(TP_DEGREES)]
    for n in REPORT_TOKENS:
        cells = []
        for t in TP_DEGREES:
            r = by_key.get((n, t))
            if r is None:
                cells.append("")
                continue
            eb, ea = (predict_layer(cm, r) / r.seconds - 1 for cm in (before, after))
            cells.append(f"{r.seconds * 1e6:.0f}: {signed(eb)} → {signed(ea)}")
        if any(cells):
            out.append(f"| {n} | " + " | ".join(cells) + " |")
    return out + [""]


def layer_summary(name: str, device: DeviceProfile, models: dict[str, CostModel], rows: list[LayerRow]) -> list[str]:
    out = []
    for label, cm in models.items():
        errors = {r: predict_layer(cm, r) / r.seconds - 1 for r in rows}
        big = [e for r, e in errors.items() if r.num_tokens >= 64]
        out.append(f"- {name} {label}: num_tokens >= 64: {error_stats(big)}")
        for part in ("compute-bound", "weight-bound", "near the ridge"):
            these = [e for r, e in errors.items() if regime(device, r) == part]
            out.append(f"  - {part} (all num_tokens): {error_stats(these)}")
    return out


def allreduce_coefficients(device: DeviceProfile, rows: list[CollectiveRow]) -> list[tuple[float, float, float]]:
    """Per row (a, b, measured) with allreduce_time = a / gbps + b * latency_us, read off CostModel at
    unit settings: the ring formula is linear in 1/bandwidth and in latency, so fits need no re-evaluation."""
    unit, lat = Links(intra_node_gbps=1.0, latency_us=0.0), Links(intra_node_gbps=1.0, latency_us=1.0)
    out = []
    for r in rows:
        a = predict_allreduce(device, unit, r.num_workers, r.size)
        out.append((a, predict_allreduce(device, lat, r.num_workers, r.size) - a, r.seconds))
    return out


def fit_bandwidth(coef: list[tuple[float, float, float]], latency: float, flat: bool = False) -> tuple[float, float]:
    """(gbps, sum of squared log errors) at a given latency; golden-section on log bandwidth.
    flat=True is the proposal: one latency per collective instead of one per ring step."""
    def loss(log_gbps: float) -> float:
        g = math.exp(log_gbps)
        return sum(math.log((a / g + (latency * 1e-6 if flat else b * latency)) / m) ** 2 for a, b, m in coef)

    lo, hi, ratio = math.log(10.0), math.log(2000.0), (math.sqrt(5) - 1) / 2
    for _ in range(50):
        x, y = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
        lo, hi = (lo, y) if loss(x) < loss(y) else (x, hi)
    return math.exp((lo + hi) / 2), loss((lo + hi) / 2)


def network_tables(gpu: str, device: DeviceProfile, before: Links, after: Links, ar: list[CollectiveRow],
                   sr: list[CollectiveRow]) -> list[str]:
    sizes = nearest_sizes(ar, REPORT_SIZES)
    by_key = {(r.num_workers, r.size): r for r in ar}
    out = [f"**{GPUS[gpu]}** all-reduce in one node, measured µs: error before → after", "",
           "| size | 2 GPUs | 4 GPUs | 8 GPUs | send/recv (pipeline hop), after |", "|---:|---|---|---|---|"]
    hops = {r.size: r for r in sr}
    for s in sizes:
        cells = []
        for p in (2, 4, 8):
            r = by_key[(p, s)]
            eb, ea = (predict_allreduce(device, links, p, s) / r.seconds - 1 for links in (before, after))
            cells.append(f"{r.seconds * 1e6:.0f}: {signed(eb)} → {signed(ea)}")
        hop = hops[s]
        cells.append(f"{hop.seconds * 1e6:.0f}: {signed(predict_transfer(device, after, s) / hop.seconds - 1)}")
        out.append(f"| {s / 2**10:.0f} KB | " + " | ".join(cells) + " |")
    for label, links in (("before", before), ("after", after)):
        errs = [predict_allreduce(device, links, r.num_workers, r.size) / r.seconds - 1 for r in ar]
        big = [e for e, r in zip(errs, ar) if r.size >= 2**20]
        out.append(f"- all-reduce {label} (intra_node_gbps {links.intra_node_gbps:g}, latency {links.latency_us:g} µs "
                   f"per ring step): sizes >= 1 MB: {error_stats(big)}; all sizes: {error_stats(errs)}")
    return out + [""]


def fit_latency(coef: list[tuple[float, float, float]], flat: bool) -> tuple[float, float]:
    """(gbps, latency µs) fitted together: a 2 µs grid, then 0.25 µs around its best."""
    _, lat = min((fit_bandwidth(coef, x, flat)[1], x) for x in range(0, 62, 2))
    _, lat = min((fit_bandwidth(coef, x, flat)[1], x) for x in (lat + i / 4 for i in range(-8, 9)) if x >= 0)
    return fit_bandwidth(coef, lat, flat)[0], lat


def network_proposals(coef: list[tuple[float, float, float]], big: list[bool],
                      fits: dict[bool, tuple[float, float]]) -> list[str]:
    """What other latency terms would give (not what CostModel does): free ring fit, and flat."""
    out = []
    for flat, (gbps, lat) in fits.items():
        errs = [(a / gbps + (lat * 1e-6 if flat else b * lat)) / m - 1 for a, b, m in coef]
        form = "one latency per collective" if flat else "ring, latency fitted too"
        out.append(f"- proposal ({form}): {gbps:.0f} GB/s, {lat:g} µs: sizes >= 1 MB: "
                   f"{error_stats([e for e, k in zip(errs, big) if k])}")
    return out


def compute_proposals(device: DeviceProfile, rows: list[LayerRow]) -> list[str]:
    """What two additions to the roofline would give (not what CostModel does): a fixed time per block
    call (kernel launches and tails; the intercept of a line through the weight-bound rows), and a
    smooth corner (c^k + m^k)^(1/k) instead of max(c, m)."""
    terms = [(roofline_terms(device, r), regime(device, r), r) for r in rows]
    weight = [(m, r.seconds) for (_, m), part, r in terms if part == "weight-bound"]
    slope, kappa = statistics.linear_regression([m for m, _ in weight], [s for _, s in weight])
    em = group_geomean([((r.model, r.tp), c / (r.seconds - kappa)) for (c, _), part, r in terms
                        if part == "compute-bound"])
    out = []
    for k in (math.inf, 2.0):
        def pred(c: float, m: float) -> float:
            c, m = c / em, m * slope
            return (max(c, m) if k == math.inf else (c ** k + m ** k) ** (1 / k)) + kappa

        errors = [pred(c, m) / r.seconds - 1 for (c, m), _, r in terms if r.num_tokens >= 64]
        weight_errors = [pred(c, m) / r.seconds - 1 for (c, m), part, r in terms if part == "weight-bound"]
        corner = "max" if k == math.inf else f"k={k:g} corner"
        out.append(f"- proposal (+{kappa * 1e6:.1f} µs per call, {corner}; matmul {em:.2f}, bw {1 / slope:.2f}): "
                   f"num_tokens >= 64: {error_stats(errors)}; weight-bound: {error_stats(weight_errors)}")
    return out


CALIBRATED_KEYS = ("matmul_efficiency", "bw_efficiency", "nvlink_gbps")
BLOCK_START = "# Calibrated by benchmarks/calibrate_gpu_profiles.py"


def write_profile(name: str, values: dict[str, float], notes: list[str]) -> None:
    """Replace the calibrated keys (and an earlier calibration block, always last) of a shipped profile."""
    path = PROFILE_DIR / f"{name}.yaml"
    lines = path.read_text(encoding="utf-8").splitlines()
    lines = [ln for ln in lines[:next((i for i, ln in enumerate(lines) if ln.startswith(BLOCK_START)), None)]
             if ln.split(":")[0] not in CALIBRATED_KEYS]
    lines.append(f"{BLOCK_START} ({datetime.date.today()}).")
    for note in notes:
        lines += textwrap.wrap(note, 100, initial_indent="# ", subsequent_indent="#   ")
    lines += [f"{k}: {v:g}" for k, v in values.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def profile_notes(source: str, gpu: str, rows: list[LayerRow], fit: ComputeFit, device: DeviceProfile,
                  free_ring: tuple[float, float]) -> list[str]:
    """Paragraphs for the profile's calibration comment, one per calibrated key."""
    models = ", ".join(sorted({r.model for r in rows}))
    by_tp = f"TP {'/'.join(map(str, fit.bw_by_tp))}: {'/'.join(f'{e:.2f}' for e in fit.bw_by_tp.values())}"
    return [
        f"Measured timings: {source}, {gpu} rows. Figures: benchmarks/RESULTS.md.",
        "matmul_efficiency: achieved/peak FLOP/s of the fused QKV, output, gate+up and down projections "
        f"({models}; TP 1-8), least squares on the log error over the {fit.num_compute} rows with num_tokens >= "
        f"{COMPUTE_BOUND * fit.ridge:.0f} (4x the ridge point). Small shards (7B at TP 8) run furthest from peak, "
        "so larger models' shards are likely faster than this predicts.",
        f"bw_efficiency: the same over the {fit.num_weight} weight-bound rows (num_tokens <= "
        f"{WEIGHT_BOUND * fit.ridge:.0f}): {by_tp}; the fall with TP is a fixed time per kernel that the "
        "roofline lacks.",
        f"nvlink_gbps: not NVLink's datasheet {DATASHEET_NVLINK_GBPS[device.name]:g} GB/s but the bandwidth that "
        "makes planc's ring all-reduce formula fit all_reduce.csv (2, 4, 8 GPUs of one DGX node, 2 KB-64 MB) "
        f"with the {Links().latency_us:g} us per ring step that named clusters use (Links' default; fitting the "
        f"latency too gives {free_ring[0]:.0f} GB/s and {free_ring[1]:g} us). Intra-node pipeline hops use it too.",
    ]


DATASHEET_NVLINK_GBPS = {"H100-80GB": 900.0, "A100-80GB": 600.0}
"""The figures the profiles carried before calibration (their datasheet comments cite them)."""


def uncalibrated(name: str) -> DeviceProfile:
    """The datasheet profile with DeviceProfile's default efficiencies: the 'before' of every table."""
    fields = DeviceProfile.model_fields
    return load_device(name).model_copy(update={
        "matmul_efficiency": fields["matmul_efficiency"].default,
        "bw_efficiency": fields["bw_efficiency"].default, "nvlink_gbps": DATASHEET_NVLINK_GBPS[name]})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--write", action="store_true", help="write the fitted numbers into planc/profiles")
    ap.add_argument("--extract", type=Path, help="write the test's subset of the data to this folder")
    args = ap.parse_args()
    commit = re.search(r"commit ([0-9a-f]{40})", (args.data / "README.md").read_text()).group(1)
    source = f"Vidur (github.com/microsoft/vidur, commit {commit}, MIT licence)"
    layers, allreduce = read_layer_rows(args.data), read_allreduce_rows(args.data)
    hops = read_sendrecv_rows(args.data)
    print(f"# Cost model vs measured GPU timings ({datetime.date.today()}; data: {source})\n")
    fitted = {}
    for gpu, name in GPUS.items():
        before = uncalibrated(name)
        rows = [r for r in layers if r.gpu == gpu]
        fit = fit_efficiencies(before, rows)
        ar = [r for r in allreduce if r.gpu == gpu]
        coef = allreduce_coefficients(before, ar)
        gbps = 5 * round(fit_bandwidth(coef, Links().latency_us)[0] / 5)
        values = {"matmul_efficiency": round(fit.matmul_efficiency, 2),
                  "bw_efficiency": round(fit.bw_efficiency, 2), "nvlink_gbps": gbps}
        after = before.model_copy(update=values)
        check_terms(after, rows)
        print(f"## {name}: matmul_efficiency {before.matmul_efficiency} → {values['matmul_efficiency']} "
              f"(fit {fit.matmul_efficiency:.3f}), bw_efficiency {before.bw_efficiency} → {values['bw_efficiency']} "
              f"(fit {fit.bw_efficiency:.3f}), nvlink_gbps {before.nvlink_gbps:g} → {gbps}\n")
        models = {"before": kernel_model(before), "after": kernel_model(after)}
        for model in sorted({r.model for r in rows}):
            print("\n".join(layer_table(gpu, model, models["before"], models["after"], rows)))
        print("\n".join(layer_summary(name, before, models, rows) + compute_proposals(before, rows)) + "\n")
        links = [Links(intra_node_gbps=d.nvlink_gbps) for d in (before, after)]
        print("\n".join(network_tables(gpu, before, *links, ar, [h for h in hops if h.gpu == gpu])))
        free = {flat: fit_latency(coef, flat) for flat in (False, True)}
        print("\n".join(network_proposals(coef, [r.size >= 2**20 for r in ar], free)) + "\n")
        fitted[name] = (values, profile_notes(source, gpu, rows, fit, before, free[False]))
    if args.write:
        for name, (values, notes) in fitted.items():
            write_profile(name, values, notes)
        for name, parent in INHERITS.items():
            write_profile(name, fitted[parent][0], [
                f"No {name} rows in the data: matmul_efficiency, bw_efficiency and nvlink_gbps are {parent}'s "
                f"fitted values (same Hopper SMs, same NVLink 4 / NVSwitch; see {parent}.yaml). Its faster HBM3e "
                "may stream at a different share of its datasheet bandwidth: unmeasured."])
    if args.extract:
        write_extract(args.extract, args.data, layers, allreduce)


if __name__ == "__main__":
    main()
