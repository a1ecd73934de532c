"""report.html in every bundle: what is shared (a variants x chain-positions picture), and, when the
bundle has a plan, the placement and the predicted latency per variant. Self-contained (inline SVG)."""
from __future__ import annotations

import html
from typing import Any, Optional

from planc.plan import Plan

_PALETTE = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7", "#9c755f"]


def sharing_svg(manifest: dict[str, Any]) -> str:
    """One row per variant, one cell per chain position; a cell's colour is its block instance: a
    column of one colour is a block every variant shares. A dot marks a LoRA delta."""
    variants = manifest["variants"]
    width = len(variants[0]["chain"]) if variants else 0
    users: dict[str, int] = {}
    for v in variants:
        for link in v["chain"]:
            users[link["block"]] = users.get(link["block"], 0) + 1
    colour, cell, left = {}, 14, 90
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{left + width * cell + 10}" '
             f'height="{len(variants) * cell + 30}" font-family="sans-serif" font-size="10">']
    for row, v in enumerate(variants):
        y = 20 + row * cell
        parts.append(f'<text x="4" y="{y + 10}">{html.escape(v["name"])}</text>')
        for col, link in enumerate(v["chain"]):
            key = link["block"]
            if users[key] == len(variants):
                fill = "#bbbbbb"  # shared by all
            else:
                fill = colour.setdefault(key, _PALETTE[len(colour) % len(_PALETTE)])
            x = left + col * cell
            parts.append(f'<rect x="{x}" y="{y}" width="{cell - 1}" height="{cell - 1}" fill="{fill}">'
                         f'<title>{html.escape(v["name"])} position {col}: {key[:12]}</title></rect>')
            if link["adapter"]:
                parts.append(f'<circle cx="{x + cell / 2}" cy="{y + cell / 2}" r="2.5" fill="black"/>')
    parts.append(f'<text x="{left}" y="12">chain position (grey: shared by every variant)</text></svg>')
    return "\n".join(parts)


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def render(manifest: dict[str, Any], plan: Optional[Plan], usable_gb: Optional[float] = None) -> str:
    from planc.plan_report import layout_label, placement_svg

    t = manifest["totals"]
    parts = ["<!doctype html><meta charset='utf-8'><title>planc bundle</title>",
             "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}</style>",
             f"<h1>planc bundle ({len(manifest['variants'])} variants, backend {html.escape(manifest['backend'])})</h1>",
             f"<p>stored {t['stored_bytes'] / 1e6:.1f} MB for {t['logical_bytes'] / 1e6:.1f} MB of chains "
             f"(dedupe {t['dedupe_ratio']:.2f}x); {len(manifest['blocks'])} unique blocks, "
             f"{len(manifest['adapters'])} adapter deltas.</p>",
             "<h2>Sharing</h2>", sharing_svg(manifest),
             _table(["variant", "kind", "logical MB"],
                    [[v["name"], v["kind"], f"{v['logical_bytes'] / 1e6:.1f}"] for v in manifest["variants"]])]
    if plan is not None:
        p = plan.predicted
        parts += [f"<h2>Plan on {html.escape(plan.cluster)}</h2>",
                  f"<p>objective {plan.objective}: predicted {p['throughput_rps']:.3g} req/s on {p['devices']} "
                  f"devices; solver {plan.solver['status']}, gap {plan.solver['gap']:.1%}.</p>",
                  placement_svg(plan, usable_gb or max([m for m in _memory(plan)] + [1.0])),
                  _table(["group", "blocks", "users", "layouts (pp x tp @ batch x replicas [blocks per stage])"],
                         [[g["id"], f"{g['blocks'][0]}..{g['blocks'][1]}", ", ".join(g["users"]),
                           ", ".join(layout_label(x) for x in g["layouts"])]
                          for g in plan.groups]),
                  "<h3>Predicted latency per variant</h3>",
                  _table(["variant", "TPOT ms", "TTFT ms"],
                         [[n, f"{v['tpot_ms']:.1f}", f"{v['ttft_ms']:.1f}"] for n, v in p["variants"].items()])]
    return "\n".join(parts) + "\n"


def _memory(plan: Plan) -> list[float]:
    per: dict[int, float] = {}
    for pl in plan.placements:
        for d in pl.devices:
            per[d] = per.get(d, 0.0) + pl.memory_gb
    return list(per.values())
