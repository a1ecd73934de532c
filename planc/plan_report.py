"""`planc plan` output: the layout as tables, the solver's figures, and a placement picture (SVG)."""
from __future__ import annotations

import html
from typing import Optional

from rich.console import Console
from rich.table import Table

from planc.plan import Plan


def _users(users: list[str], limit: int = 4) -> str:
    return ", ".join(users[:limit]) + (f" +{len(users) - limit}" if len(users) > limit else "")


def layout_label(layout: dict) -> str:
    """One layout of a group as `pp x tp @batch xreplicas`, with a pipeline's blocks per stage (where its
    stages are cut).

    >>> layout_label({"pp": 2, "tp": 4, "batch": 64, "replicas": 3, "stage_blocks": [4, 5]})
    '2x4 @64 x3 [4|5]'
    >>> layout_label({"pp": 1, "tp": 8, "batch": 128, "replicas": 1, "stage_blocks": [9]})
    '1x8 @128 x1'
    """
    sizes = layout.get("stage_blocks") or []
    cuts = f" [{'|'.join(str(n) for n in sizes)}]" if len(sizes) > 1 else ""
    return f"{layout['pp']}x{layout['tp']} @{layout['batch']} x{layout['replicas']}{cuts}"


def group_table(plan: Plan) -> Table:
    t = Table(title="Block groups: layout (PP x TP), decode batch, replicas; a pipeline's blocks per stage",
              title_justify="left")
    for col in ("group", "blocks", "users", "share", "layouts (pp x tp @ batch x replicas [blocks per stage])",
                "TPOT ms", "TTFT ms"):
        t.add_column(col, justify="right" if col in ("share", "TPOT ms", "TTFT ms") else "left")
    for g in plan.groups:
        layouts = ", ".join(layout_label(x) for x in g["layouts"])
        tpot = max((x["tpot_ms"] for x in g["layouts"]), default=0.0)
        ttft = max((x["ttft_ms"] for x in g["layouts"]), default=0.0)
        t.add_row(g["id"], f"{g['blocks'][0]}..{g['blocks'][1]} ({g['num_blocks']})", _users(g["users"]),
                  f"{g['share']:.2f}", layouts, f"{tpot:.1f}", f"{ttft:.1f}")
    return t


def device_table(plan: Plan, usable_gb: Optional[float] = None) -> Table:
    t = Table(title="Devices: stages placed, memory", title_justify="left")
    for col in ("device", "node", "stages (group/replica/stage)", "memory GB", "load req/s"):
        t.add_column(col, justify="right" if col in ("memory GB", "load req/s") else "left")
    per_device: dict[int, list] = {}
    for p in plan.placements:
        for d in p.devices:
            per_device.setdefault(d, []).append(p)
    for d in sorted(per_device):
        ps = per_device[d]
        mem = sum(p.memory_gb for p in ps)
        label = ", ".join(f"{p.group}/{p.replica}/{p.stage}" + (f" tp{p.tp}" if p.tp > 1 else "") for p in ps)
        mem_s = f"{mem:.1f}" + (f" / {usable_gb:.0f}" if usable_gb else "")
        t.add_row(str(d), str(ps[0].node), label, mem_s, f"{sum(p.load_rps for p in ps):.2f}")
    return t


def variant_table(plan: Plan) -> Table:
    t = Table(title="Predicted per variant (cost model)", title_justify="left")
    for col in ("variant", "TPOT ms", "TTFT ms"):
        t.add_column(col, justify="left" if col == "variant" else "right")
    for name, v in plan.predicted["variants"].items():
        t.add_row(name, f"{v['tpot_ms']:.1f}", f"{v['ttft_ms']:.1f}")
    return t


def engine_table(plan: Plan) -> Table:
    """One row per node's engine: the variants routed to it, its share of the traffic, lanes, capacity."""
    t = Table(title="Engines: one per node, each over its node's copies; the router splits each variant's "
                    "requests as shown", title_justify="left")
    for col in ("node", "variants (part of their requests)", "share", "lanes", "engine req/s", "at plan's split"):
        t.add_column(col, justify="left" if col.startswith("variants") else "right")
    for node, e in sorted((plan.predicted.get("engines") or {}).items(), key=lambda kv: int(kv[0])):
        routed = [f"{v}" + (f" ({r[node]:.0%})" if r[node] < 0.995 else "")
                  for v, r in plan.routes.items() if r.get(node, 0) > 0]
        whole = e["engine_capacity_rps"] / e["share"] if e["share"] > 0 else float("inf")
        t.add_row(node, _users(routed, 6), f"{e['share']:.2f}", str(e["lanes"]), f"{e['engine_capacity_rps']:.3g}",
                  f"{whole:.3g}")
    return t


def solver_line(plan: Plan) -> str:
    s = plan.solver
    bound = s["bound"]
    return (f"solver {s['solver']} ({s['method']}): {s['status']}, objective {s['objective']:.4g}, "
            f"bound {bound:.4g}, gap {s['gap']:.1%}, {s['seconds']:.1f} s (limit {s['time_limit_s']:g} s, "
            f"seed {s['seed']})" + ("; the time limit stopped the search, so another run may differ"
                                    if s.get("time_limit_hit") else ""))


def print_plan(console: Console, plan: Plan, cluster_desc: str, usable_gb: float,
               baselines: Optional[dict] = None) -> None:
    p = plan.predicted
    console.print(f"[bold]plan[/bold] for {cluster_desc}; objective: {plan.objective}")
    console.print(group_table(plan))
    console.print(device_table(plan, usable_gb))
    if len(p["variants"]) <= 24:
        console.print(variant_table(plan))
    console.print(f"predicted throughput {p['throughput_rps']:.3g} req/s on {p['devices']} devices "
                  f"(SLO TPOT {plan.settings['slo']['tpot_ms']:g} ms, TTFT {plan.settings['slo']['ttft_ms']:g} ms; "
                  f"mean prompt {plan.settings['prompt_tokens']:.0f}, output {plan.settings['output_tokens']:.0f} tokens)"
                  + (f"; the engine keeps {plan.settings['lanes']} lane(s)" if plan.settings.get("lanes") else ""))
    if p.get("engines"):
        console.print(engine_table(plan))
        console.print(f"as the engines run it (a stage's copies step together, each lane waiting for the slowest "
                      f"call; the busiest node saturates first): {p['engine_capacity_rps']:.3g} req/s "
                      "(planc.lane_model); the figure above lets every copy step at its own pace", markup=False)
    elif "engine_capacity_rps" in p:
        console.print(f"as the one engine runs it (a stage's copies step together, each lane waiting for the "
                      f"slowest call): {p['engine_capacity_rps']:.3g} req/s (planc.lane_model); the figure above lets "
                      "every copy step at its own pace", markup=False)
    console.print(solver_line(plan), markup=False)
    if "simulated_capacity_rps" in p:
        console.print(f"simulated on planc's runtime: {p['simulated_capacity_rps']:.3g} req/s with 90% of requests "
                      "within the SLO", markup=False)
        ranked = plan.solver.get("ranked_by_simulation") or {}
        if len(ranked) > 1:
            console.print("candidates simulated: " + "; ".join(f"{label} {rps:.3g}" for label, rps in ranked.items()),
                          markup=False)
    if baselines:
        parts = []
        for name, b in baselines.items():
            text = f"{name.replace('_', ' ')} {b['throughput_rps']:.3g} req/s"
            if b.get("engine_capacity_rps"):
                text += f" (engine {b['engine_capacity_rps']:.3g})"
            if "simulated_capacity_rps" in b:
                text += f" (simulated {b['simulated_capacity_rps']:.3g})"
            parts.append(text + ("" if b["fits"] else " (does not fit)"))
        console.print("baselines, same cost model: " + "; ".join(parts), markup=False)


_COLORS = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7", "#9c755f",
           "#bab0ac"]


def placement_svg(plan: Plan, usable_gb: float) -> str:
    """Devices as columns, stages stacked by memory, one colour per block group."""
    per_device: dict[int, list] = {}
    for p in plan.placements:
        for d in p.devices:
            per_device.setdefault(d, []).append(p)
    devices = sorted(per_device)
    width, height, col = 60 + 70 * max(len(devices), 1), 320, 70
    scale = 240 / max(usable_gb, 1e-9)
    colour = {g["id"]: _COLORS[i % len(_COLORS)] for i, g in enumerate(plan.groups)}
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
             f'font-size="10">', f'<text x="10" y="14">memory per device (of {usable_gb:.0f} GB usable)</text>']
    for i, d in enumerate(devices):
        x, y = 40 + i * col, 280
        parts.append(f'<rect x="{x}" y="{280 - 240}" width="50" height="240" fill="none" stroke="#999"/>')
        for p in per_device[d]:
            h = p.memory_gb * scale
            y -= h
            label = html.escape(f"{p.group}/{p.replica}/{p.stage}: {', '.join(p.blocks[:1])}.. {p.memory_gb:.1f} GB")
            parts.append(f'<rect x="{x}" y="{y:.1f}" width="50" height="{h:.1f}" fill="{colour[p.group]}" '
                         f'stroke="white"><title>{label}</title></rect>')
        parts.append(f'<text x="{x + 25}" y="295" text-anchor="middle">d{d}</text>')
    parts.append("</svg>")
    return "\n".join(parts)
