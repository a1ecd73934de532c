"""The ray backend on a real local Ray cluster (2 CPUs, fractional CPUs per actor, bound to 127.0.0.1):
the tiny example with each of its 2 stages in its own actor gives the local backend's greedy outputs
under concurrent load; a killed stage actor is restarted by Ray and every in-flight request completes
(recomputed, still exact) or gets a 503; the generated manifests follow the plan. Manifest tests and
the no-ray test run without Ray installed; the cluster tests skip then."""
from __future__ import annotations

import importlib.util
import os
import pickle
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml

import planc
from planc.bundle import Bundle
from planc.pass_manager import PassContext
from planc.runtime.server import ServeOptions
from tests.serving import ServerProcess

# Read when ray is imported: without it, a driver joining 127.0.0.1 is sent to this host's other address.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "token")  # the server's cluster (a child inherits this) and our driver agree
HAS_RAY = importlib.util.find_spec("ray") is not None
needs_ray = pytest.mark.skipif(not HAS_RAY, reason="ray is not installed (pip install 'planc[ray]')")

PROMPTS = {"base": "The quiet river", "legal": "The Tenant shall", "support": "User: Can you tell me about a recipe",
           "chat": "User: Can you tell me about the weather?\nAssistant:"}
SHORT, LONG = 16, 40
STAGE_TIMEOUT_S = 8.0
"""How long the deployment under test waits for a dead stage before answering 503."""
DEADLINE_S = 60.0
"""No request may take longer than this, whatever is killed."""


@pytest.fixture(scope="module")
def ray_bundle(tiny_example, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ray") / "tiny"
    return planc.emit(planc.compile(planc.load(tiny_example)), backend="ray", out=out)


@pytest.fixture(scope="module")
def expected(ray_bundle) -> dict[tuple[str, int], tuple[str, int]]:
    """(variant, max_tokens) -> (text, completion tokens) from the local backend's engine and API."""
    from fastapi.testclient import TestClient

    from planc.runtime.server import build_app, build_state

    state = build_state(Bundle.open(ray_bundle), ServeOptions())
    out = {}
    with TestClient(build_app(state)) as client:
        for variant, prompt in PROMPTS.items():
            for n in (SHORT, LONG):
                body = client.post("/v1/completions", json=_request(variant, n)).json()
                out[(variant, n)] = (body["choices"][0]["text"], body["usage"]["completion_tokens"])
    return out


def _request(variant: str, max_tokens: int, **extra) -> dict:
    return {"model": variant, "prompt": PROMPTS[variant], "max_tokens": max_tokens, "temperature": 0, **extra}


def _stage_actors() -> dict[str, object]:
    """Stage actor name -> handle (named by the ingress: planc.<app>.<replica>.<stage>.<copy>)."""
    import ray

    return {a["name"]: ray.get_actor(a["name"], namespace=a["namespace"])
            for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith("planc.")}


def _join_cluster(srv: ServerProcess) -> None:
    """Join the private Ray cluster of a `planc serve` process (to find its actors); stops it on failure."""
    import ray

    address = next(m.group(1) for line in srv.banner if (m := re.search(r"cluster at (\S+):", line)))
    assert address.startswith("127.0.0.1:")
    joining = threading.Thread(target=ray.init, daemon=True, kwargs=dict(  # ray.init may retry for minutes
        address=address, namespace="planc-tests", log_to_driver=False, logging_level="ERROR",
        _node_ip_address="127.0.0.1"))
    joining.start()
    joining.join(60)
    if not ray.is_initialized():
        srv.stop()
        pytest.fail(f"could not join the server's Ray cluster at {address}")


@needs_ray
class TestPlancServeOnRay:
    """One `planc serve` process (its own private Ray cluster); this test process joins the cluster only
    to find and kill stage actors."""

    @pytest.fixture(scope="class")
    def server(self, ray_bundle):
        import ray

        srv = ServerProcess(ray_bundle, "--stage-timeout", str(STAGE_TIMEOUT_S), "--shutdown-timeout", "5")
        _join_cluster(srv)
        yield srv
        ray.shutdown()
        srv.stop()

    @pytest.fixture(scope="class")
    def url(self, server):
        return server.url

    def test_each_stage_runs_in_its_own_actor(self, url):
        import ray

        infos = [ray.get(h.info.remote(), timeout=10) for h in _stage_actors().values()]
        assert sorted(tuple(i["positions"]) for i in infos) == [(0, 1, 2), (3, 4, 5)]
        assert len({i["pid"] for i in infos} | {os.getpid()}) == 3
        assert httpx.get(url + "/health", timeout=10).json() == {"status": "ok"}

    def test_greedy_outputs_equal_the_local_backend_under_concurrency(self, url, expected):
        results = _concurrently(url, [(v, SHORT, i % 2 == 1) for i in range(3) for v in PROMPTS])
        assert len(results) == 12
        for (variant, _, _), (status, text, tokens) in results:
            assert status == 200 and (text, tokens) == expected[(variant, SHORT)], variant

    def test_a_killed_stage_actor_restarts_and_no_request_hangs(self, url, expected, record_property):
        import ray

        actors = _stage_actors()
        name = next(n for n, h in actors.items() if ray.get(h.info.remote())["positions"][0] == 3)
        before = ray.get(actors[name].info.remote())
        work = [(v, LONG, i % 2 == 0) for i in range(2) for v in PROMPTS]
        results: list = []
        runner = threading.Thread(target=lambda: results.extend(_concurrently(url, work)))
        runner.start()
        _wait_running(url, len(work) // 2)
        killed = time.monotonic()
        ray.kill(actors[name], no_restart=False)
        recovered = _first_success_after(url, killed)
        runner.join(DEADLINE_S)
        assert not runner.is_alive() and len(results) == len(work), "a request hung past the deadline"
        for (variant, n, _), (status, text, tokens) in results:
            assert status in (200, 503), (variant, status, text)
            if status == 200:  # recomputed after the restart: still the exact greedy continuation
                assert (text, tokens) == expected[(variant, n)], variant
            else:
                assert "unavailable" in text
        after = ray.get(actors[name].info.remote(), timeout=DEADLINE_S)
        assert after["pid"] != before["pid"] and after["incarnation"] != before["incarnation"]
        record_property("recovery_s", round(recovered, 2))
        print(f"\nstage actor killed under load: a new request succeeded {recovered:.2f} s later; "
              f"in-flight: {sum(r[0] == 200 for _, r in results)} completed, "
              f"{sum(r[0] == 503 for _, r in results)} got 503")

    def test_a_stage_that_stays_down_gets_a_clear_503(self, url):
        import ray

        actors = _stage_actors()
        name = next(n for n, h in actors.items() if ray.get(h.info.remote())["positions"][0] == 0)
        ray.kill(actors[name], no_restart=True)  # gone for good: nothing to recompute on
        start = time.monotonic()
        r = httpx.post(url + "/v1/completions", json=_request("base", SHORT), timeout=DEADLINE_S)
        assert r.status_code == 503 and r.headers["retry-after"]
        assert r.json()["error"]["code"] == "stage_unavailable"
        assert time.monotonic() - start < STAGE_TIMEOUT_S + 10


    def test_sigterm_exits_0_and_stops_its_ray_cluster(self, server):
        import ray

        tree = _descendants(server.proc.pid)
        assert any("raylet" in cmd for cmd in tree.values()) and any("ray::" in cmd for cmd in tree.values())
        ray.shutdown()  # this test process leaves the cluster before it goes
        assert server.stop() == 0
        deadline = time.monotonic() + 15
        while any(_alive(pid) for pid in tree) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [cmd for pid, cmd in tree.items() if _alive(pid)]

def _concurrently(url: str, work: list[tuple[str, int, bool]]) -> list[tuple[tuple, tuple[int, str, int]]]:
    """Send every (variant, max_tokens, stream) at once; [(item, (status, text or error, completion tokens))]."""
    results: list = [None] * len(work)

    def call(i: int) -> None:
        variant, n, stream = work[i]
        try:
            results[i] = (work[i], _complete(url, variant, n, stream))
        except httpx.HTTPError as exc:
            results[i] = (work[i], (0, repr(exc), 0))

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(work))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(DEADLINE_S)
    return [r for r in results if r is not None]


def _complete(url: str, variant: str, n: int, stream: bool) -> tuple[int, str, int]:
    import json

    body = _request(variant, n, stream=stream, **({"stream_options": {"include_usage": True}} if stream else {}))
    if not stream:
        r = httpx.post(url + "/v1/completions", json=body, timeout=DEADLINE_S)
        if r.status_code != 200:
            return r.status_code, r.text, 0
        data = r.json()
        return 200, data["choices"][0]["text"], data["usage"]["completion_tokens"]
    text, tokens = [], 0
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=DEADLINE_S) as r:
        if r.status_code != 200:
            return r.status_code, r.read().decode(), 0
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:  # headers were sent: the 503 comes in-band
                return 503, chunk["error"]["message"], 0
            text += [c["text"] for c in chunk["choices"]]
            tokens = (chunk.get("usage") or {}).get("completion_tokens", tokens)
    return 200, "".join(text), tokens


def _wait_running(url: str, at_least: int) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        metrics = httpx.get(url + "/metrics", timeout=10).text
        running = [float(l.split()[-1]) for l in metrics.splitlines() if l.startswith("planc_requests_running")]
        if running and running[0] >= at_least:
            return
        time.sleep(0.05)
    raise AssertionError("the requests never ran")


def _first_success_after(url: str, since: float) -> float:
    """Seconds from `since` until a new request succeeds."""
    while time.monotonic() - since < DEADLINE_S:
        try:
            if httpx.post(url + "/v1/completions", json=_request("legal", 2), timeout=DEADLINE_S).status_code == 200:
                return time.monotonic() - since
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"no request succeeded within {DEADLINE_S} s of the kill")


def _descendants(pid: int) -> dict[int, str]:
    """Every process below `pid` (pid -> command line), from /proc."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = {}, [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            try:
                out[child] = (Path("/proc") / str(child) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            todo.append(child)
    return out


def _alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@needs_ray
def test_a_port_taken_before_serve_binds_it_is_replaced_and_a_busy_port_is_refused(ray_bundle, monkeypatch):
    """`--port 0`: the free port planc picks can be taken (Ray's own processes bind ports) before Serve binds
    it; planc picks another. A busy `--port N` is one error line."""
    import socket

    from planc.backends import ray_launch

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        picks, real = iter([taken]), ray_launch.free_port
        monkeypatch.setattr(ray_launch, "free_port", lambda host: next(picks, None) or real(host))
        deployment = ray_launch.deploy(Bundle.open(ray_bundle), ServeOptions(), "127.0.0.1", 0, None)
        try:
            assert deployment.port != taken
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                try:
                    if httpx.get(f"http://127.0.0.1:{deployment.port}/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.5)
            else:
                pytest.fail("the deployment never became healthy")
        finally:
            ray_launch.undeploy()
        r = subprocess.run([sys.executable, "-m", "planc.cli", "serve", str(ray_bundle), "--port", str(taken)],
                           capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stdout + r.stderr
    assert r.stderr.strip().splitlines() == [f"error: --port {taken}: 127.0.0.1:{taken} is already in use"]


# ------------------------------------------------------------------------------ one engine per plan node
TWO_CPU_NODES = ("nodes: 2\ndevices_per_node: 1\n"
                 "device: {name: cpu-test, kind: cpu, memory_gb: 2, peak_tflops: {fp32: 0.2}, mem_bw_gbps: 10}\n")


@pytest.fixture(scope="module")
def two_node_bundle(tiny_example, tmp_path_factory) -> Path:
    """The tiny example planned for two CPU nodes of one device each: the plan uses both nodes."""
    return _planned_ray_bundle(tiny_example, tmp_path_factory.mktemp("ray-two-nodes"), TWO_CPU_NODES)


def _planned_ray_bundle(example: Path, root: Path, cluster: str, backend: str = "ray") -> Path:
    """The example compiled with a plan for the cluster file `cluster`, for `backend`, under `root`."""
    (root / "cluster.yaml").write_text(cluster)
    ctx = PassContext()
    ctx.options["cost"] = {"cluster": str(root / "cluster.yaml")}
    return planc.emit(planc.compile(planc.load(example), ctx=ctx), backend=backend, out=root / "tiny")


def test_a_two_node_plan_gets_one_engine_per_node_over_that_nodes_actors(two_node_bundle):
    plan = Bundle.open(two_node_bundle).plan
    layout = _read(two_node_bundle)[0]["applications"][0]["args"]["layout"]
    assert {p.node for p in plan.placements} == {0, 1}, "the tiny example should use both nodes"
    assert [e["node"] for e in layout["engines"]] == [0, 1] and layout["stages"] == []
    routed = {v: {int(k) for k, w in r.items() if w > 0} for v, r in plan.routes.items()}
    assert set(routed) == set(PROMPTS)
    for e in layout["engines"]:
        mine = [a for a in layout["actors"] if a["engine"] == e["node"]]
        assert mine and all(set(a["nodes"]) == {e["node"]} for a in mine)  # an engine calls its node's copies only
        assert [p for lo, hi in e["stages"] for p in range(lo, hi)] == list(range(6))
        for variant, nodes in routed.items():  # every variant routed here has a copy at every stage
            if e["node"] in nodes:
                assert all(any(variant in a["variants"] for a in mine if a["stage"] == i)
                           for i in range(len(e["stages"])))


@needs_ray
def test_a_two_node_plan_serves_the_local_backends_tokens(two_node_bundle, expected):
    srv = ServerProcess(two_node_bundle, "--shutdown-timeout", "5", startup_s=180)
    try:
        assert any("one engine per plan node (2)" in line for line in srv.banner), srv.banner
        _assert_serves_local_tokens(srv.url, expected)
    finally:
        assert srv.stop() == 0


def _assert_serves_local_tokens(url: str, expected) -> None:
    """Every variant twice at once (streamed and not): the local backend's greedy text and token count."""
    results = _concurrently(url, [(v, SHORT, i % 2 == 1) for i in range(2) for v in PROMPTS])
    assert len(results) == 8
    for (variant, _, _), (status, text, tokens) in results:
        assert status == 200 and (text, tokens) == expected[(variant, SHORT)], variant


# ------------------------------------------------------------------------------ tensor parallelism
TP_CLUSTER = ("nodes: 1\ndevices_per_node: 2\n"
              "device: {name: cpu-test, kind: cpu, memory_gb: 0.04, peak_tflops: {fp32: 0.2}, mem_bw_gbps: 10}\n")


@pytest.fixture(scope="module")
def tp_bundle(tiny_example, tmp_path_factory) -> Path:
    """The tiny example planned for one node of two small devices: the trunk that base, legal and chat (the
    LoRA) share runs at TP 2, the tops at TP 1."""
    return _planned_ray_bundle(tiny_example, tmp_path_factory.mktemp("ray-tp"), TP_CLUSTER)


def test_a_tensor_parallel_copy_runs_as_one_actor_per_rank(tp_bundle):
    from planc.backends.ray_layout import RayLayout
    from planc.backends.ray_placement import node_bundles

    plan = Bundle.open(tp_bundle).plan
    users = {g["id"]: set(g["users"]) for g in plan.groups}
    assert {"chat", "base"} <= set.union(*[users[p.group] for p in plan.placements if p.tp == 2])
    assert any(p.tp == 1 for p in plan.placements)
    layout = RayLayout.from_json(_read(tp_bundle)[0]["applications"][0]["args"]["layout"])
    tp = [a for a in layout.actors if a.tp]
    assert tp and all(set(a.tp) == {2} and "chat" in a.variants for a in tp)
    labels = [label for items in node_bundles(layout).values() for label, _ in items]
    for a in tp:  # a placement-group bundle per rank, each with a rank's share
        assert [f"{a.name}.0", f"{a.name}.0.r1"] == a.labels(0) and set(a.labels(0)) <= set(labels)
    assert len(labels) == sum(a.num_actors for a in layout.actors)
    readme = (tp_bundle / "README.md").read_text()
    assert all(f"| {a.name} | {a.positions[0]}-{a.positions[1] - 1} | {', '.join(a.variants)} | {a.copies} | 2 |"
               in readme for a in tp) and "torch.distributed" in readme


def test_the_local_backend_says_it_runs_a_tensor_parallel_plans_copies_whole(tiny_example, tmp_path, expected):
    bundle = _planned_ray_bundle(tiny_example, tmp_path, TP_CLUSTER, backend="local")
    srv = ServerProcess(bundle, "--shutdown-timeout", "5")
    try:
        assert any("TP up to 2; this backend runs every copy whole" in line for line in srv.banner), srv.banner
        r = httpx.post(srv.url + "/v1/completions", json=_request("chat", SHORT), timeout=DEADLINE_S).json()
        assert (r["choices"][0]["text"], r["usage"]["completion_tokens"]) == expected[("chat", SHORT)]
    finally:
        assert srv.stop() == 0


@needs_ray
class TestTensorParallelOnRay:
    """The TP plan served by `planc serve` (its own private Ray cluster, which this test process joins to
    find the ranks' actors)."""

    @pytest.fixture(scope="class")
    def server(self, tp_bundle):
        import ray

        srv = ServerProcess(tp_bundle, "--stage-timeout", str(STAGE_TIMEOUT_S), "--shutdown-timeout", "5",
                            startup_s=180)
        _join_cluster(srv)
        yield srv
        ray.shutdown()
        assert srv.stop() == 0

    @pytest.fixture(scope="class")
    def layout(self, tp_bundle):
        from planc.backends.ray_layout import RayLayout

        return RayLayout.from_json(_read(tp_bundle)[0]["applications"][0]["args"]["layout"])

    def _ranks(self, layout) -> list[tuple[object, list]]:
        """Per TP actor spec of the layout: (spec, [(rank's actor handle, its info)] for copy 0)."""
        import ray

        actors = _stage_actors()
        out = []
        for a in (a for a in layout.actors if a.tp):
            handles = [next(h for n, h in actors.items() if n.endswith("." + label)) for label in a.labels(0)]
            out.append((a, [(h, ray.get(h.info.remote(), timeout=30)) for h in handles]))
        return out

    def test_each_rank_is_an_actor_holding_its_shard_and_the_tokens_are_the_local_backends(
            self, server, layout, tp_bundle, expected):
        """Each rank of the TP copy in its own actor, joined by gloo on 127.0.0.1: the local backend's greedy
        tokens for every variant, the LoRA one (whose adapter runs on the TP copy) included."""
        from planc.runtime.stage import Stage

        assert any(f"in {sum(a.num_actors for a in layout.actors)} stage actors" in line for line in server.banner), \
            server.banner
        _assert_serves_local_tokens(server.url, expected)
        for a, ranks in self._ranks(layout):
            infos = [info for _, info in ranks]
            assert [i["tensor_parallel"] for i in infos] == [[0, 2], [1, 2]]
            assert len({i["pid"] for i in infos}) == 2 and infos[0]["positions"] == infos[1]["positions"]
            whole = Stage(Bundle.open(tp_bundle), range(*a.positions), 1 << 20, 4, variants=list(a.variants))
            unsharded = sum(p.numel() for m in whole.modules.values() for p in m.parameters())
            # each rank holds half of every projection, of the embedding and of the head (the norms whole)
            assert all(i["parameters"] < 0.8 * unsharded for i in infos), (infos, unsharded)

    @pytest.mark.parametrize("rank", [1, 0])
    def test_a_killed_rank_restarts_the_copy_rejoins_and_no_request_hangs(self, server, layout, expected, rank):
        """A rank of the TP copy killed under load (rank 0 too, whose node and port the group meets at): the
        other's collectives fail, the copy fails as a whole, its sequences are recomputed (or get 503), and
        once Ray has restarted the rank the copy forms a new group and serves the exact greedy tokens again."""
        import ray

        (_, ranks), = self._ranks(layout)
        victim, before = ranks[rank]
        work = [(v, LONG, i % 2 == 0) for i in range(2) for v in PROMPTS]
        results: list = []
        runner = threading.Thread(target=lambda: results.extend(_concurrently(server.url, work)))
        runner.start()
        _wait_running(server.url, len(work) // 2)
        killed = time.monotonic()
        ray.kill(victim, no_restart=False)
        recovered = _first_success_after(server.url, killed)
        runner.join(DEADLINE_S)
        assert not runner.is_alive() and len(results) == len(work), "a request hung past the deadline"
        for (variant, n, _), (status, text, tokens) in results:
            assert status in (200, 503), (variant, status, text)
            if status == 200:
                assert (text, tokens) == expected[(variant, n)], variant
        after = ray.get(victim.info.remote(), timeout=DEADLINE_S)
        assert after["pid"] != before["pid"] and after["tensor_parallel"] == [rank, 2]
        _assert_serves_local_tokens(server.url, expected)  # the re-formed group computes the same
        print(f"\nTP rank {rank} killed under load: a new request succeeded {recovered:.2f} s later; in-flight: "
              f"{sum(r[0] == 200 for _, r in results)} completed, {sum(r[0] == 503 for _, r in results)} got 503")


# ------------------------------------------------------------------------------ several Ray nodes
@pytest.fixture(scope="module")
def three_ray_nodes():
    """A real Ray cluster of three nodes on this machine (a head and two workers, one CPU each: each holds
    one of the two-node plan's nodes, 1.0 CPU of stage actors, and no node holds two)."""
    import secrets

    from ray.cluster_utils import Cluster

    # Token auth (set above): `ray.init(address="local")` writes ~/.ray/auth_token when there is none, and every
    # process of this machine reads it; a Cluster's head does not write one, so do it as ray.init would.
    token = Path.home() / ".ray" / "auth_token"
    if not os.environ.get("RAY_AUTH_TOKEN") and not token.exists():
        token.parent.mkdir(parents=True, exist_ok=True)
        token.write_text(secrets.token_hex(32))
    args = dict(num_cpus=1, node_ip_address="127.0.0.1", object_store_memory=100 * 2**20)
    cluster = Cluster(initialize_head=False)
    try:
        cluster.add_node(**args, include_dashboard=False)
        for _ in range(2):
            cluster.add_node(**args)
        cluster.wait_for_nodes()
        yield cluster
    finally:
        cluster.shutdown()


@needs_ray
def test_each_plan_node_runs_on_one_ray_node_and_serves_the_local_backends_tokens(two_node_bundle, expected,
                                                                                  three_ray_nodes):
    """Joined to a cluster of three Ray nodes, each plan node's stage actors all run on one Ray node, the two
    plan nodes on two different ones (without placement groups Ray spread node 0's four actors over all three
    nodes), and the served tokens are the local backend's."""
    import ray

    srv = ServerProcess(two_node_bundle, "--address", three_ray_nodes.address, "--shutdown-timeout", "5",
                        startup_s=180)
    try:
        (line,) = [line for line in srv.banner if "plan nodes on Ray nodes:" in line]
        shown = dict(re.findall(r"(\d+) -> ([0-9a-f]{8}) \(127\.0\.0\.1\)", line))
        assert set(shown) == {"0", "1"} and len(set(shown.values())) == 2, line
        ray.init(address=three_ray_nodes.address, namespace="planc-tests", log_to_driver=False,
                 logging_level="ERROR", _node_ip_address="127.0.0.1")
        try:
            where: dict[str, set] = {}
            for name, handle in _stage_actors().items():  # planc.<app>.<replica>.n<node>-stage...<copy>
                node = re.search(r"\.n(\d+)-stage", name).group(1)
                where.setdefault(node, set()).add(ray.get(handle.info.remote(), timeout=30)["node_id"][:8])
        finally:
            ray.shutdown()
        assert where == {k: {v} for k, v in shown.items()}, where
        _assert_serves_local_tokens(srv.url, expected)
    finally:
        assert srv.stop() == 0


@needs_ray
def test_a_plan_node_no_ray_node_can_hold_is_refused_at_once_in_one_line(planned_bundle, three_ray_nodes):
    """A GPU plan joined to a CPU cluster: one line naming the bundle and the plan node, before deploying."""
    start = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "planc.cli", "serve", str(planned_bundle), "--address",
                        three_ray_nodes.address], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stdout + r.stderr
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith(f"error: {planned_bundle}: plan node 0's stage actors need") and "GPU" in line, line
    assert "the cluster's 3 nodes have (CPU, GPU): (1, 0), (1, 0), (1, 0)" in line, line
    assert time.monotonic() - start < 60


def test_node_bundles_follow_the_layout_and_fit_what_the_plan_gave_each_node(two_node_bundle, ray_bundle):
    from planc.backends.ray_layout import RayLayout
    from planc.backends.ray_placement import node_bundles, unplaceable

    layout = RayLayout.from_json(_read(two_node_bundle)[0]["applications"][0]["args"]["layout"])
    bundles = node_bundles(layout)
    assert sorted(bundles) == [0, 1]
    for node, items in bundles.items():  # one bundle per copy, labelled as the ingress names the actor
        mine = [a for a in layout.actors if a.engine == node]
        assert [label for label, _ in items] == [f"{a.name}.{c}" for a in mine for c in range(a.copies)]
        assert sum(r["CPU"] for _, r in items) == pytest.approx(sum(a.num_cpus * a.copies for a in mine))
    one_cpu = {"Alive": True, "Resources": {"CPU": 1.0}}
    assert unplaceable(layout, [one_cpu, one_cpu]) is None
    need = sum(r["CPU"] for _, r in bundles[0])
    assert f"plan node 0's stage actors need {round(need, 4):g} CPU on one Ray node" in unplaceable(
        layout, [{**one_cpu, "Alive": False}])
    no_plan = RayLayout.from_json(_read(ray_bundle)[0]["applications"][0]["args"]["layout"])
    assert node_bundles(no_plan) == {} and unplaceable(no_plan, []) is None  # no plan: Ray places them


# ---------------------------------------------------------------------------------------------- no cluster
@pytest.fixture(scope="module")
def planned_bundle(tiny_example, tmp_path_factory) -> Path:
    ctx = PassContext()
    ctx.options["cost"] = {"cluster": "2xH100-80GB"}
    program = planc.compile(planc.load(tiny_example), ctx=ctx)
    return planc.emit(program, backend="ray", out=tmp_path_factory.mktemp("ray-planned") / "tiny")


def _read(bundle: Path) -> tuple[dict, dict, str]:
    return (yaml.safe_load((bundle / "serve_config.yaml").read_text()),
            yaml.safe_load((bundle / "k8s" / "rayservice.yaml").read_text()), (bundle / "Dockerfile").read_text())


def test_manifests_follow_the_plan(planned_bundle):
    from collections import Counter

    bundle = Bundle.open(planned_bundle)
    plan, config = bundle.plan, _read(planned_bundle)[0]
    assert bundle.manifest["backend"] == "ray" and bundle.manifest["entry_points"]["serve_config"] == "serve_config.yaml"
    app = config["applications"][0]
    assert app["import_path"] == "planc.backends.ray_app:app_builder" and app["route_prefix"] == "/"
    layout = app["args"]["layout"]
    (ingress,) = app["deployments"]
    assert ingress["num_replicas"] == 1 and ingress["ray_actor_options"]["num_cpus"] == layout["ingress_num_cpus"]
    assert [tuple(s) for s in layout["stages"]] == [(r.start, r.stop) for r in plan.stage_ranges(6)]
    per_device = Counter((p.node, d) for p in plan.placements for d in p.devices)
    for g in plan.groups:  # every group served where the plan put it: its variants, positions, replicas, share
        mine = [a for a in layout["actors"] if a["group"] == g["id"]]
        assert mine and all(a["variants"] == g["users"] for a in mine)
        assert sorted(p for a in mine for p in range(*a["positions"])) == \
            list(range(g["first_position"], g["first_position"] + g["num_blocks"]))
        placements = [p for p in plan.placements if p.group == g["id"]]
        share = min(p.tp / max(per_device[(p.node, d)] for d in p.devices) for p in placements)
        for a in mine:
            assert a["copies"] == sum(lay["replicas"] for lay in g["layouts"]) == len(a["nodes"])
            assert 0 < a["num_gpus"] <= share and 0 < a["num_cpus"] < 1
            assert set(a["nodes"]) <= {p.node for p in placements}
    assert sum(a["num_gpus"] * a["copies"] for a in layout["actors"]) <= len(plan.devices_used())
    _check_kubernetes(planned_bundle, config, {p.node for p in plan.placements}, gpus_per_worker=2)


def test_without_a_plan_each_stage_is_one_cpu_actor_holding_every_variant(ray_bundle):
    config = _read(ray_bundle)[0]
    layout = config["applications"][0]["args"]["layout"]
    assert layout["device"] == "cpu" and [tuple(s) for s in layout["stages"]] == [(0, 3), (3, 6)]
    for actor, (lo, hi) in zip(layout["actors"], layout["stages"]):
        assert actor["positions"] == [lo, hi] and actor["copies"] == 1 and actor["num_gpus"] == 0
        assert sorted(actor["variants"]) == sorted(PROMPTS) and 0 < actor["num_cpus"] < 1
    _check_kubernetes(ray_bundle, config, {0}, gpus_per_worker=0)


def _check_kubernetes(bundle: Path, config: dict, nodes: set[int], gpus_per_worker: int) -> None:
    """The RayService runs serve_config.yaml on one worker per plan node that can hold its actors, from the
    image the Dockerfile builds."""
    _, service, dockerfile = _read(bundle)
    assert service["apiVersion"] == "ray.io/v1" and service["kind"] == "RayService"
    assert yaml.safe_load(service["spec"]["serveConfigV2"]) == config
    cluster = service["spec"]["rayClusterConfig"]
    (workers,) = cluster["workerGroupSpecs"]
    assert workers["replicas"] == workers["minReplicas"] == workers["maxReplicas"] == len(nodes)
    limits = workers["template"]["spec"]["containers"][0]["resources"]["limits"]
    layout = config["applications"][0]["args"]["layout"]
    for node in nodes:
        on_node = [(a, a["nodes"].count(node) if a["nodes"] else a["copies"]) for a in layout["actors"]]
        assert sum(a["num_gpus"] * n for a, n in on_node) <= int(limits.get("nvidia.com/gpu", 0))
        assert sum(a["num_cpus"] * n for a, n in on_node) + layout["ingress_num_cpus"] <= float(limits["cpu"])
    assert int(limits.get("nvidia.com/gpu", 0)) == gpus_per_worker
    image = re.search(r"docker build -t (\S+) \.", dockerfile).group(1)
    pods = [cluster["headGroupSpec"], workers]
    assert {c["image"] for pod in pods for c in pod["template"]["spec"]["containers"]} == {image}
    kind = "gpu" if gpus_per_worker else "cpu"
    assert f"rayproject/ray:{cluster['rayVersion']}-py311-{kind}" in dockerfile
    assert f"COPY --chown=ray:users . {config['applications'][0]['args']['bundle']}" in dockerfile
    assert "planc[ray]" in dockerfile


def test_planc_imports_and_refuses_a_ray_bundle_in_one_line_without_ray(ray_bundle):
    code = ("import sys\n"
            "import planc, planc.cli, planc.backends.ray, planc.backends.ray_layout\n"
            "assert 'ray' not in sys.modules, 'importing planc imported ray'\n"
            "sys.modules['ray'] = None  # as if it were not installed\n"
            f"sys.exit(planc.cli.main(['serve', {str(ray_bundle)!r}]))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stderr
    assert r.stderr.strip().splitlines() == \
        ["error: this bundle was compiled for the ray backend; install Ray: pip install 'planc[ray]'"]


@needs_ray
def test_kv_mirror_matches_the_cache_page_for_page():
    import random

    import torch

    from planc.backends.ray_stage import StageCopy
    from planc.runtime.kv_cache import KVCache

    cache, layers = KVCache(40, 4, 1, 2, torch.float32), [0, 1, 2]
    mirror = StageCopy(None, "test")
    mirror.attached({"incarnation": "x", "num_layers": 3, "num_pages": 40, "page_size": 4})
    rng, lengths = random.Random(0), {}
    for _ in range(500):
        seq = rng.randrange(8)
        if rng.random() < 0.3:
            cache.free(seq)
            mirror.release(seq)
            lengths.pop(seq, None)
            continue
        n = lengths.get(seq, 0) + rng.randrange(1, 9)
        assert cache.extra_pages(seq, layers, n) == mirror.extra(seq, n)
        granted = cache.reserve(seq, layers, n)
        assert mirror.reserve(seq, n) == granted
        if granted:
            lengths[seq] = n
        assert cache.num_free == mirror.free


@needs_ray
def test_packed_tensors_round_trip_exactly():
    import torch

    from planc.backends.ray_stage import pack, unpack

    for dtype in (torch.float32, torch.bfloat16, torch.int64):
        tensors = {3: torch.arange(12).reshape(4, 3).to(dtype), 9: torch.arange(3).reshape(1, 3).to(dtype)}
        back = unpack(pack(tensors))
        assert list(back) == [3, 9] and all(torch.equal(back[k], tensors[k]) for k in tensors)
    ids = {1: torch.tensor([5, 6, 7]), 2: torch.tensor([8])}  # token ids: one dimension, ragged
    assert all(torch.equal(unpack(pack(ids))[k], v) for k, v in ids.items())


def test_backend_ray_in_model_yaml(tiny_example, tmp_path):
    spec = tiny_example.parent / "model-ray.yaml"
    spec.write_text(tiny_example.read_text().replace("backend: local", "backend: ray"))
    out = planc.emit(planc.compile(planc.load(spec)), out=tmp_path / "bundle")
    assert Bundle.open(out).manifest["backend"] == "ray" and (out / "k8s" / "rayservice.yaml").is_file()


@needs_ray
def test_serving_a_gpu_plan_on_a_cpu_machine_is_refused_in_one_line(planned_bundle):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has GPUs")
    r = subprocess.run([sys.executable, "-m", "planc.cli", "serve", str(planned_bundle)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 1
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith("error: this bundle's stages need") and "--cluster local" in line


# ------------------------------------------------------------------------------ a copy's ranks failing
@pytest.fixture(scope="module")
def private_ray():
    """planc's own private Ray cluster (127.0.0.1), in this process."""
    import ray

    from planc.backends.ray_launch import start_ray

    start_ray(None, 0.0)
    yield ray
    ray.shutdown()


def _rank_actors(ray, behaviours: list[str]):
    """Actors that answer a stage call as a rank would: `ok`, raise a code error (`bug`), report its group
    broken (`broken`), or hang (`hang`); `name:s`: its group join takes s seconds (fails when s < 0)."""
    import pickle as pk

    from planc.runtime.tensor_parallel import GroupBroken

    class Rank:
        def __init__(self, behaviour: str, join_s: float = 0.0):
            self.behaviour, self.join_s = behaviour, join_s

        def run(self, request: bytes) -> bytes:
            if self.behaviour == "bug":
                raise ValueError("a bug in the block code")
            if self.behaviour == "broken":
                raise GroupBroken("all-reduce failed")
            if self.behaviour == "hang":
                time.sleep(30)
            return pk.dumps(self.behaviour)

        def attach(self) -> dict:
            return {"incarnation": self.behaviour, "num_layers": 1, "num_pages": 4, "page_size": 2}

        def group_address(self):
            return "127.0.0.1", 1

        def join_group(self, address: str, port: int) -> str:
            if self.join_s < 0:
                raise RuntimeError("the rendezvous failed")
            time.sleep(self.join_s)
            return self.behaviour

    actor = ray.remote(num_cpus=0.01)(Rank)
    return [actor.remote(b.split(":")[0], float(b.split(":")[1]) if ":" in b else 0.0) for b in behaviours]


@needs_ray
def test_a_copy_reports_a_code_error_at_once_and_fails_as_a_whole_when_a_rank_is_lost(private_ray):
    """Rank 1 raises a code error while rank 0 hangs (as in a collective that waits for it): the error is
    raised at once, as itself, and the copy's group is marked for re-forming. A rank whose group broke, or
    that died, fails the copy (`StageFailed`, recomputed by the engine)."""
    from planc.backends.ray_stage import RemoteStage, StageCopy
    from planc.runtime.stage import StageFailed

    ray = private_ray

    def call(behaviours):
        handles = _rank_actors(ray, behaviours)
        copy = StageCopy(handles[0], "copy", tuple(handles[1:]))
        copy.broken = False
        stage = RemoteStage(range(0, 1), {"a": [copy]}, call_timeout_s=20)
        return stage, copy, handles, [h.run.remote(b"") for h in handles]

    stage, copy, _, refs = call(["hang", "bug"])
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="a bug in the block code"):
        stage._get(copy, refs)
    assert time.monotonic() - start < 10 and copy.broken
    stage, copy, _, refs = call(["ok", "broken"])
    with pytest.raises(StageFailed, match="all-reduce failed"):
        stage._get(copy, refs)
    assert copy.broken
    stage, copy, handles, _ = call(["ok", "ok"])
    ray.kill(handles[1], no_restart=True)
    with pytest.raises(StageFailed, match="stage actor copy failed"):
        stage._get(copy, [h.run.remote(b"") for h in handles])
    stage, copy, _, refs = call(["ok", "ok"])
    assert pickle.loads(stage._get(copy, refs)) == "ok" and not copy.broken


@needs_ray
def test_a_tensor_parallel_copy_attaches_within_each_callers_timeout(private_ray):
    """The ranks' group join takes 3 s: an attach with 0.5 s returns within about that (the join goes on), a
    later one with time to spare completes it; a join that fails is seen at once and the next attach starts
    over."""
    from ray.exceptions import GetTimeoutError

    from planc.backends.ray_stage import StageCopy

    ray = private_ray
    handles = _rank_actors(ray, ["a:3", "b:3"])
    ray.get([h.attach.remote() for h in handles])  # started
    copy = StageCopy(handles[0], "copy", (handles[1],))
    start = time.monotonic()
    with pytest.raises(GetTimeoutError):
        copy.attach(0.5)
    assert time.monotonic() - start < 1.5 and copy.broken
    copy.attach(10)
    assert not copy.broken and copy.incarnations == ("a", "b") and copy.num_pages == 4
    failing = _rank_actors(ray, ["a:0", "b:-1"])
    copy = StageCopy(failing[0], "copy", (failing[1],))
    with pytest.raises(Exception, match="the rendezvous failed"):
        copy.attach(10)
    assert copy._joining is None and copy.broken


@needs_ray
def test_a_stage_actor_that_cannot_start_is_reported_in_one_line(private_ray):
    """A rank refusing its bundle (here: a TP degree that does not divide the KV heads) fails the start-up with
    that one line, not Ray's traceback."""
    from planc.backends.ray_stage import StageCopy, wait_attached
    from planc.errors import PlancError
    from planc.runtime.stage import StageFailed

    class Refusing:
        def __init__(self):
            raise PlancError("bundle: tensor parallelism 8: config.json's num_key_value_heads (4) is not a multiple of 8")

        def info(self) -> dict:
            return {}

    handle = private_ray.remote(num_cpus=0.01)(Refusing).remote()
    with pytest.raises(StageFailed) as err:
        wait_attached([StageCopy(handle, "stage0-g0.0")], 30, lambda label: "")
    assert str(err.value) == ("stage actor stage0-g0.0 could not start: bundle: tensor parallelism 8: config.json's "
                              "num_key_value_heads (4) is not a multiple of 8")
