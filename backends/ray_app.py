"""The Ray Serve application of a ray bundle: `serve_config.yaml`'s import_path points here.

One ingress deployment runs planc's own engine and OpenAI-compatible API (planc.runtime.server,
unchanged); on a plan over several nodes, one engine per node behind that API, each over its node's
actors, a request going to the engine the plan routes its variant to (`planc.runtime.router`). The
engine's stages are `RemoteStage` proxies over `StageWorker` actors that the ingress
starts with the resources of the bundle's layout, each plan node's actors on one Ray node
(`planc.backends.ray_placement`). The actors are the ingress replica's children: if
the replica goes, they go with it (their KV belongs to its engine); if one of them dies, Ray
restarts it and the engine recomputes what it lost.
"""
from __future__ import annotations

from dataclasses import asdict, fields
from typing import Any, Optional

import ray
from ray import serve

from planc.backends.ray import INGRESS
from planc.backends.ray_layout import MAX_ONGOING_REQUESTS, RayLayout
from planc.backends.ray_placement import reserve
from planc.backends.ray_stage import RemoteStage, StageCopy, StageWorker, wait_attached
from planc.bundle import Bundle
from planc.runtime.engine import EngineConfig
from planc.runtime.server import ServeOptions, build_app, build_state, engine_config

STARTUP_TIMEOUT_S = 300.0
"""How long stage actors may take to be placed and load their blocks before the deployment fails."""


def serve_options(options: dict[str, Any]) -> ServeOptions:
    known = {f.name for f in fields(ServeOptions)}
    return ServeOptions(**{k: v for k, v in options.items() if k in known})


def start_stages(bundle: Bundle, layout: RayLayout, config: EngineConfig, options: ServeOptions,
                 prefix: str, timeout_s: float = STARTUP_TIMEOUT_S, engine: Optional[int] = None,
                 placement: Optional[dict[str, Any]] = None) -> list[RemoteStage]:
    """Start every copy of every stage actor (of node `engine`'s engine, on a layout with one engine
    per node), wait until each has loaded its blocks, return the proxies. `placement`: a copy's
    scheduling strategy by its label (`ray_placement.reserve`); a copy not in it goes where Ray puts it."""
    placement = placement or {}
    worker = ray.remote(StageWorker)
    num_layers = bundle.arch.num_layers
    plans, everyone, needs = [], [], {}
    stages = layout.stages if engine is None else next(e.stages for e in layout.engines if e.node == engine)
    for i, (lo, hi) in enumerate(stages):
        layers = sum(1 for p in range(lo, hi) if 0 < p <= num_layers)
        kv_bytes = max(1, config.kv_cache_bytes * layers // num_layers)  # as in-process stages split it
        by_variant: dict[str, list[StageCopy]] = {}
        for spec in layout.actors_of(i, engine):
            copies = []
            for c in range(spec.copies):
                labels, size = spec.labels(c), spec.ranks(c)
                handles = [worker.options(
                    name=prefix + label, num_cpus=spec.num_cpus, num_gpus=spec.num_gpus,
                    scheduling_strategy=placement.get(label),  # None: Ray's default
                    max_restarts=-1,  # a restart costs only the KV of its sequences, which the engine recomputes
                    max_task_retries=0,  # a call that was in flight fails; the engine decides what to redo
                ).remote(str(bundle.root), (lo, hi), list(spec.variants), kv_bytes, config.page_size, asdict(options),
                         (rank, size) if size > 1 else None) for rank, label in enumerate(labels)]
                copies.append(StageCopy(handles[0], labels[0], tuple(handles[1:])))
                needs[labels[0]] = f"{size} x ({spec.num_cpus} CPU, {spec.num_gpus} GPU)"
            by_variant.update({v: copies for v in spec.variants})
            everyone += copies
        plans.append((range(lo, hi), by_variant))
    wait_attached(everyone, timeout_s, lambda label: needs[label])
    # A step that takes longer than this is taken for a hung stage (a long prefill may take seconds).
    call_timeout = max(60.0, config.stage_timeout_s)
    return [RemoteStage(r, by_variant, call_timeout_s=call_timeout) for r, by_variant in plans]


@serve.deployment(name=INGRESS, max_ongoing_requests=MAX_ONGOING_REQUESTS)
@serve.ingress()
class PlancIngress:
    """The engine and the HTTP API of planc serve, with its stages in actors."""

    def __init__(self, bundle: str, layout: dict, options: dict):
        self.bundle = Bundle.open(bundle)
        opts = serve_options(options)
        self.layout = RayLayout.from_json(layout)
        context = serve.get_replica_context()
        prefix = f"planc.{context.app_name}.{context.replica_id.unique_id}."
        # one engine over every actor, or one per plan node over that node's actors (the router then
        # sends each request to one of them)
        parts = [(e.node, e.stages) for e in self.layout.engines] or [(None, self.layout.stages)]
        placement = reserve(self.layout, prefix, STARTUP_TIMEOUT_S)  # each plan node's actors on one Ray node
        engines = {}
        for node, stages in parts:
            config = engine_config(self.bundle, opts, None if node is None else self.bundle.plan.for_node(node))
            config.stage_positions = [range(lo, hi) for lo, hi in stages]
            engines[node] = (config, start_stages(self.bundle, self.layout, config, opts, prefix, engine=node,
                                                  placement=placement))
        if None in engines:
            self.state = build_state(self.bundle, opts, *engines[None])
        else:
            self.state = build_state(self.bundle, opts, nodes=engines)

    def __serve_build_asgi_app__(self):
        return build_app(self.state)


def app_builder(args: dict[str, Any]):
    """What `serve run serve_config.yaml` calls: args = {bundle, layout, options}."""
    layout = RayLayout.from_json(args["layout"])
    options = dict(args.get("options") or {})
    deployment = PlancIngress.options(ray_actor_options={"num_cpus": layout.ingress_num_cpus},
                                      graceful_shutdown_timeout_s=float(options.get("shutdown_timeout_s", 30.0)))
    return deployment.bind(args["bundle"], layout.to_json(), options)
