"""The ray backend: the bundle as a Ray Serve application, its stages as Ray actors.

`planc compile --backend ray` writes, beside the blocks: `serve_config.yaml` (for `serve run` /
`serve deploy`), `k8s/rayservice.yaml` (a KubeRay RayService running that config), a `Dockerfile`
(planc + the bundle) and `run.py`. The layout (which actor serves which stage, its copies and
resources) comes from the plan (`planc.backends.ray_layout`). `planc serve` on such a bundle starts
a private Ray cluster on 127.0.0.1 (or joins one) and deploys it (`planc.backends.ray_launch`).
Nothing here imports ray: compiling for Ray does not need it installed.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any, Optional

import yaml

import planc
from planc.backends.ray_layout import MAX_ONGOING_REQUESTS, RayLayout, layout_for
from planc.program import Program
from planc.templating import render

APP_NAME = "planc"
INGRESS = "PlancIngress"
IMPORT_PATH = "planc.backends.ray_app:app_builder"
RAY_VERSION = "2.60.0"
"""The rayproject/ray image the Dockerfile starts from (planc[ray] itself needs ray[serve]>=2.9)."""
BUNDLE_DIR = "/opt/planc/bundle"
"""Where the Dockerfile puts the bundle, and so where serve_config.yaml looks for it."""
PROCESS_GB = 0.75
"""Host memory of one Ray worker process with torch loaded, before weights."""


class RayBackend:
    name = "ray"

    def emit(self, program: Program, root: Path, ctx) -> dict[str, str]:
        """Options (`ctx.options["ray"]`): `image` (default planc-<base>:<input digest>), `bundle_dir`."""
        opts = ctx.options_for("ray")
        layout = program_layout(program)
        image = opts.get("image") or default_image(program)
        bundle_dir = opts.get("bundle_dir", BUNDLE_DIR)
        config = serve_config(layout, bundle_dir)
        body = yaml.safe_dump(config, sort_keys=False, width=120, default_flow_style=None)
        config_text = render("ray/serve_config.yaml.j2", body=body)
        variants = list(program.chains)
        files = {
            "serve_config.yaml": config_text,
            "k8s/rayservice.yaml": render("ray/rayservice.yaml.j2", **rayservice_values(program, layout, image),
                                          serve_config=config_text),
            "Dockerfile": render("ray/Dockerfile.j2", image=image, ray_version=RAY_VERSION, gpu=layout.device == "gpu",
                                 planc_version=planc.__version__, bundle_dir=bundle_dir),
            "run.py": render("ray/run.py.j2", variants=variants),
            "README.md": render("ray/README.md.j2", variants=variants, layout=layout, image=image,
                                base=program.spec.base.name),
        }
        for name, text in files.items():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_text(text)
        os.chmod(root / "run.py", 0o755)
        return {"serve_config": "serve_config.yaml", "rayservice": "k8s/rayservice.yaml", "dockerfile": "Dockerfile",
                "run": "run.py", "readme": "README.md"}

    def serve(self, bundle, options, host: str, port: int, shutdown_timeout: float, address: Optional[str]) -> None:
        from planc.backends.ray_launch import serve_bundle  # imports ray: only when serving

        serve_bundle(bundle, options, host, port, shutdown_timeout, address)


def program_layout(program: Program) -> RayLayout:
    chain_length = len(next(iter(program.chains.values())).links)
    cluster = (program.extras.get("plan_inputs") or {}).get("cluster") if program.plan is not None else None
    kind = cluster.device.kind if cluster is not None else None
    per_node = cluster.devices_per_node if cluster is not None else 0
    return layout_for(list(program.chains), chain_length, program.plan, kind, per_node)


def serve_config(layout: RayLayout, bundle_dir: str, options: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """The Serve config file's content: one application, its ingress deployment, the layout as its args."""
    return {
        "proxy_location": "HeadOnly",
        "http_options": {"host": "0.0.0.0", "port": 8000},
        "applications": [{
            "name": APP_NAME,
            "route_prefix": "/",
            "import_path": IMPORT_PATH,
            "args": {"bundle": bundle_dir, "layout": layout.to_json(), "options": options or {}},
            "deployments": [{
                "name": INGRESS,
                # its engines (one per plan node) schedule every sequence; the stages carry the data parallelism
                "num_replicas": 1,
                "max_ongoing_requests": MAX_ONGOING_REQUESTS,
                "ray_actor_options": {"num_cpus": layout.ingress_num_cpus},
            }],
        }],
    }


def default_image(program: Program) -> str:
    digest = hashlib.sha256(json.dumps(program.input_digests, sort_keys=True).encode()).hexdigest()[:12]
    return f"planc-{program.spec.base.name}:{digest}"


def rayservice_values(program: Program, layout: RayLayout, image: str) -> dict[str, Any]:
    """Worker group sizes from the layout: one worker per plan node, each with its copies' GPUs, CPUs and memory."""
    gpus = layout.gpus_per_node()
    cpus, memory = _node_demand(program, layout)
    nodes = sorted(set(cpus) | set(gpus)) or [0]
    return {
        "name": f"planc-{program.spec.base.name}".lower().replace("_", "-"),
        "image": image,
        "ray_version": RAY_VERSION,
        "workers": len(nodes),
        "worker_gpus": layout.devices_per_node if layout.device == "gpu" else 0,
        "worker_cpus": max(2, math.ceil(max(cpus.values(), default=0) + layout.ingress_num_cpus)),
        "worker_memory_gi": max(4, math.ceil(max(memory.values(), default=0))),
    }


def _node_demand(program: Program, layout: RayLayout) -> tuple[dict[int, float], dict[int, float]]:
    """Per plan node: Ray CPUs and host memory (GiB: weights + KV share + one process per copy)."""
    kv_bytes = program.spec.serving.kv_cache_mb * 2**20
    num_layers = program.base.checkpoint.arch.num_layers
    cpus: dict[int, float] = {}
    memory: dict[int, float] = {}
    for a in layout.actors:
        weights = _actor_weight_bytes(program, a.variants, range(*a.positions))
        layers = sum(1 for p in range(*a.positions) if 0 < p <= num_layers)
        gib = (weights + kv_bytes * layers / num_layers) / 2**30
        for c, node in enumerate(a.nodes or (0,) * a.copies):
            # the ranks of a tensor-parallel copy hold its weights between them, each in its own process
            cpus[node] = cpus.get(node, 0.0) + a.num_cpus * a.ranks(c)
            memory[node] = memory.get(node, 0.0) + gib + PROCESS_GB * a.ranks(c)
    return cpus, memory


def _actor_weight_bytes(program: Program, variants: tuple[str, ...], positions: range) -> int:
    blocks, adapters = set(), set()
    for name in variants:
        for p in positions:
            link = program.chains[name].links[p]
            blocks.add(link.block)
            if link.adapter:
                adapters.add(link.adapter)
    return sum(program.zoo[k].nbytes for k in blocks) + sum(program.adapter_zoo[k].nbytes for k in adapters)
