"""`planc serve` for a ray bundle: a private Ray cluster on 127.0.0.1 (or an existing one), deploy, wait.

The bundle's own serve_config.yaml is what gets deployed (its application args, with the bundle's
path here instead of the image's); SIGTERM or Ctrl-C drains in-flight requests (Serve's graceful
shutdown), removes the application and stops the cluster planc started.
"""
from __future__ import annotations

import logging
import math
import os
import signal
import sys
import threading
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import yaml

from planc.backends.ray import APP_NAME
from planc.backends.ray_layout import RayLayout
from planc.backends.ray_placement import placed_nodes, unplaceable
from planc.bundle import Bundle
from planc.errors import PlancError
from planc.net import free_port

OBJECT_STORE_BYTES = 200 * 2**20
"""Small: stages exchange hidden states of one step, never weights."""
PORT_ATTEMPTS = 3
"""Free ports tried for `--port 0` (one can be taken between picking it and Serve binding it)."""


def read_app_args(bundle: Bundle) -> dict:
    path = bundle.root / "serve_config.yaml"
    try:
        config = yaml.safe_load(path.read_text())
        args = dict(config["applications"][0]["args"])
        RayLayout.from_json(args["layout"])
    except (OSError, yaml.YAMLError, KeyError, IndexError, TypeError, ValueError) as exc:
        raise PlancError(f"{path}: not a planc ray serve config ({type(exc).__name__}: {exc})") from None
    return args


def start_ray(address: Optional[str], num_gpus_needed: float, num_cpus_needed: float = 0.0) -> bool:
    """Join `address`, or start a private cluster bound to 127.0.0.1; returns whether planc started it.

    A private cluster offers this machine's CPUs, or as many as the actors ask for when that is more (a
    bundle planned for a larger CPU cluster then runs here oversubscribed, and says so): Ray would
    otherwise leave the actors it cannot place pending until the start-up times out."""
    # Before ray is imported: keep a private cluster on loopback and quiet (no usage report over the network).
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        import ray
    except ImportError:
        raise PlancError("this bundle was compiled for the ray backend; install Ray: pip install 'planc[ray]'") from None
    common = dict(include_dashboard=False, log_to_driver=False, logging_level="WARNING", namespace="planc")
    if address is not None:
        try:
            ray.init(address=address, **common)
        except (ConnectionError, ValueError, RuntimeError) as exc:
            raise PlancError(f"--address {address}: cannot join the Ray cluster ({exc})") from None
        return False
    gpus = _local_gpus()
    if num_gpus_needed > gpus:  # checked before starting a cluster that could never place the stages
        raise PlancError(f"this bundle's stages need {num_gpus_needed:.3g} GPUs (planned for a GPU cluster); this "
                         f"machine has {gpus}: compile with --cluster local, or join a GPU cluster with --address")
    # Ray runs workers at nice 15 by default; here the workers are the server (engine, stages, HTTP proxy),
    # and a local server would not yield to every other process on the machine either.
    os.environ.setdefault("RAY_worker_niceness", "0")
    cpus = os.cpu_count() or 1
    if num_cpus_needed > cpus:
        print(f"planc: this bundle's actors ask for {num_cpus_needed:.3g} CPUs (planned for a larger cluster); this "
              f"machine has {cpus}: running them oversubscribed", flush=True)
    ray.init(address="local", num_cpus=max(cpus, math.ceil(num_cpus_needed)), object_store_memory=OBJECT_STORE_BYTES,
             _node_ip_address="127.0.0.1", **common)
    return True


def _local_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@dataclass
class Deployment:
    port: int
    started: bool
    """Whether planc started the Ray cluster (and stops it at the end)."""
    address: str
    """The Ray cluster's GCS address (for `ray status --address`, or a driver that joins it)."""


def deploy(bundle: Bundle, options, host: str, port: int, address: Optional[str], shutdown_timeout: float = 30.0,
           after_start: Optional[Callable[[], None]] = None) -> Deployment:
    """Start (or join) Ray and run the bundle's Serve application with `options` over its serve_config.yaml.

    `after_start` runs once Ray is up: ray.init replaces the process's SIGTERM handler with its own.
    """
    args = read_app_args(bundle)
    args["bundle"] = str(bundle.root.resolve())
    args["options"] = {**(args.get("options") or {}), **asdict(options), "shutdown_timeout_s": shutdown_timeout}
    layout = RayLayout.from_json(args["layout"])
    started = start_ray(address, sum(a.num_gpus * a.num_actors for a in layout.actors),
                        sum(a.num_cpus * a.num_actors for a in layout.actors) + layout.ingress_num_cpus)
    if after_start is not None:
        after_start()
    import ray
    from ray import serve

    from planc.backends.ray_app import app_builder

    problem = unplaceable(layout, ray.nodes())  # at once, rather than a deployment pending until it times out
    if problem is not None:
        ray.shutdown()
        raise PlancError(f"{bundle.root}: {problem}")

    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # planc's banner says what matters
    for attempt in range(PORT_ATTEMPTS):
        chosen = port or free_port(host)
        try:
            serve.start(http_options={"host": host, "port": chosen}, logging_config={"log_level": "WARNING"})
            break
        except RuntimeError as exc:
            taken = "Failed to bind to address" in str(exc)
            if taken and not port and attempt + 1 < PORT_ATTEMPTS:
                serve.shutdown()  # a free port we picked was taken before Serve bound it (Ray's own processes
                continue          # bind ports too): pick another
            ray.shutdown()
            if taken:
                raise PlancError(f"--port {chosen}: {host}:{chosen} is already in use") from None
            raise PlancError(f"the Ray Serve HTTP proxy failed to start: {str(exc).strip().splitlines()[0]}") from None
    try:
        serve.run(app_builder(args), name=APP_NAME, route_prefix="/", blocking=False)
    except RuntimeError as exc:
        ray.shutdown()
        raise PlancError(f"the Ray Serve application failed to deploy: {str(exc).strip().splitlines()[0]}") from None
    return Deployment(chosen, started, ray.get_runtime_context().gcs_address)


def undeploy() -> None:
    """Drain and remove the application (Serve waits for in-flight requests), then leave or stop Ray."""
    import ray
    from ray import serve

    try:
        serve.delete(APP_NAME)
    finally:
        ray.shutdown()  # a cluster planc started stops with it (and Serve's actors in it)


def serve_bundle(bundle: Bundle, options, host: str, port: int, shutdown_timeout: float,
                 address: Optional[str]) -> None:
    stop = threading.Event()

    def on_signal() -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, frame: stop.set())

    on_signal()  # a SIGTERM while deploying also ends cleanly (after the deployment)
    deployment = deploy(bundle, options, host, port, address, shutdown_timeout, after_start=on_signal)
    try:
        _banner(bundle, RayLayout.from_json(read_app_args(bundle)["layout"]), host, deployment)
        stop.wait()
        print("planc: SIGTERM, finishing in-flight requests", flush=True)
    finally:
        undeploy()


def _placed_nodes() -> dict[int, str]:
    """Plan node -> "<Ray node id, 8 hex> (<its address>)", from the placement groups the ingress reserved."""
    import ray

    addresses = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}
    return {k: f"{node_id[:8]} ({addresses.get(node_id, '?')})"
            for k, node_id in placed_nodes(f"planc.{APP_NAME}.").items()}


def _banner(bundle: Bundle, layout: RayLayout, host: str, deployment: Deployment) -> None:
    variants = ", ".join(f"{n} ({v['kind']})" for n, v in bundle.variants.items())
    actors = sum(a.num_actors for a in layout.actors)
    where = "a private Ray cluster" if deployment.started else "the Ray cluster"
    print(f"planc serving {len(bundle.variants)} variants: {variants}", flush=True)
    if layout.engines:
        stages = " + ".join(f"{len(e.stages)}" for e in layout.engines)
        print(f"  on {where} at {deployment.address}: one engine per plan node ({len(layout.engines)}), "
              f"{stages} stages in {actors} stage actors ({layout.device}), one ingress", flush=True)
    else:
        print(f"  on {where} at {deployment.address}: {len(layout.stages)} stages in {actors} stage actors "
              f"({layout.device}), one ingress", flush=True)
    placed = _placed_nodes()
    if placed:
        print("  plan nodes on Ray nodes: " + ", ".join(f"{k} -> {where}" for k, where in placed.items()), flush=True)
    if not bundle.manifest.get("tenants"):
        print("  tenants: none configured; the server is open to every client (no API keys)", flush=True)
    print(f"  listening on http://{host}:{deployment.port}  (OpenAI API at /v1, /health, /metrics)", flush=True)
    sys.stdout.flush()
