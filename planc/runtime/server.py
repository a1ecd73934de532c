"""`planc serve`: the OpenAI-compatible HTTP server over one engine.

The engine runs in its own thread; each request gets an asyncio queue fed from the engine's
sink. Streaming uses server-sent events; a client that goes away aborts its sequence, which frees
its KV at the next engine step.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import AsyncIterator, Optional, Union

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from planc.bundle import Bundle
from planc.errors import PlancError
from planc.kernels import KernelSelection, load_tuned
from planc.kernels.dispatch import ENV_VAR as KERNELS_ENV_VAR
from planc.runtime.engine import Engine, EngineConfig, Event, QueueFull, StepStats, plan_lanes
from planc.runtime.router import RoutedEngines
from planc.runtime.metrics import Metrics
from planc.runtime.openai_api import ApiError, GenerationRequest, completion_body, parse_request, usage_of
from planc.runtime.text import Detokenizer, TextCodec


@dataclass
class ServeOptions:
    """Overrides of the bundle's `serving` settings, from the command line."""

    kv_cache_mb: Optional[float] = None
    max_running: Optional[int] = None
    max_queue: Optional[int] = None
    max_model_len: Optional[int] = None
    threads: int = 1
    """Intra-op threads of the engine; on small CPU matmuls more threads are slower."""
    kernels: Optional[str] = None
    """Op implementations: auto | torch | triton | op=impl,... (default: $PLANC_KERNELS, else auto)."""
    stage_timeout_s: Optional[float] = None
    """Seconds a failed out-of-process stage (ray backend) may take to come back before its requests get 503."""
    max_batch_tokens: Optional[int] = None
    """Tokens per engine step (chunked prefill); default: the bundle's, else 512 on a CPU and 2048 on a GPU
    (with a plan: what each copy's step carries at the plan's load, `Plan.engine_limits`)."""
    lanes: Optional[int] = None
    """Lanes through pipelined stages (ray backend); default: the count the planner chose for the plan
    (`plan_lanes`), else one per stage."""


def kernel_selection(bundle: Bundle, options: ServeOptions) -> KernelSelection:
    """The --kernels choice over the bundle's tuned configs (kernels.json, when the bundle has one)."""
    tuned_file = bundle.root / "kernels.json"
    tuned = load_tuned(tuned_file) if tuned_file.is_file() else {}
    source = "--kernels" if options.kernels is not None else KERNELS_ENV_VAR
    text = options.kernels if options.kernels is not None else os.environ.get(KERNELS_ENV_VAR, "")
    try:
        return KernelSelection.parse(text, tuned)
    except ValueError as exc:
        raise PlancError(f"{source}: {exc}") from None


def engine_config(bundle: Bundle, options: ServeOptions, plan=None) -> EngineConfig:
    """The engine's settings: model.yaml's serving, the options, and the plan (`plan`: the part of the
    bundle's plan this engine runs, `Plan.for_node`; default the whole of it)."""
    s = dict(bundle.manifest.get("serving") or {})
    for key in ("kv_cache_mb", "max_running", "max_queue", "max_model_len", "max_batch_tokens"):
        if getattr(options, key) is not None:
            s[key] = getattr(options, key)
    max_len = s.get("max_model_len") or min(bundle.arch.max_position_embeddings, 4096)
    caps, stages, lanes = {}, None, options.lanes
    running, tokens = 64, default_batch_tokens()
    plan = plan or bundle.plan
    if plan is not None:  # the runtime follows the plan: batch caps, stages, lanes, engine limits
        # a planned block runs its layout's decode batch in one call, as the planner costed it (a split
        # call streams the weights again), unless model.yaml's serving sets a cap
        caps = {k: min(c, s.get("block_batch_cap", c)) for k, c in plan.block_batch_caps().items()}
        chain_length = len(next(iter(bundle.variants.values()))["chain"])
        stages = plan.stage_ranges(chain_length)
        if lanes is None:
            lanes = plan_lanes(plan, len(stages))
        running, tokens = plan.engine_limits(chain_length, tokens)
    config = EngineConfig(kv_cache_bytes=int(float(s.get("kv_cache_mb", 64)) * 2**20), page_size=s.get("page_size", 16),
                          max_running=s.get("max_running") or running,
                          max_batch_tokens=s.get("max_batch_tokens") or tokens,
                          block_batch_cap=s.get("block_batch_cap", 256), max_queue=s.get("max_queue", 256),
                          max_model_len=max_len, block_caps=caps, stage_positions=stages, lanes=lanes)
    if options.stage_timeout_s is not None:
        config.stage_timeout_s = options.stage_timeout_s
    return config


def default_batch_tokens() -> int:
    """Tokens per step when the bundle does not say: on a CPU a step of 512 tokens already runs its
    matmuls at full speed, and a smaller step holds less activation memory and stalls decodes less."""
    return 2048 if torch.cuda.is_available() else 512


def tenant_keys(bundle: Bundle, environ=os.environ) -> Optional[dict[str, tuple[str, Optional[set[str]]]]]:
    """API key -> (tenant, allowed variants or None for all); None when no tenants are configured."""
    tenants = bundle.manifest.get("tenants") or []
    if not tenants:
        return None
    keys = {}
    for t in tenants:
        key = environ.get(t["api_key_env"])
        if not key:
            raise PlancError(f"tenant {t['name']}: environment variable {t['api_key_env']} (its API key) is not set")
        keys[key] = (t["name"], None if "*" in t["variants"] else set(t["variants"]))
    return keys


@dataclass
class ServerState:
    bundle: Bundle
    engine: Union[Engine, RoutedEngines]
    codecs: dict[str, TextCodec]
    keys: Optional[dict[str, tuple[str, Optional[set[str]]]]]
    metrics: Metrics
    stop: threading.Event = field(default_factory=threading.Event)
    pump: Optional["_EventPump"] = None


def build_state(bundle: Bundle, options: ServeOptions, config: Optional[EngineConfig] = None,
                stages: Optional[list] = None, nodes: Optional[dict[int, tuple[EngineConfig, list]]] = None) -> ServerState:
    """`config` defaults to engine_config(bundle, options); `stages` (e.g. remote ones) to in-process stages.
    `nodes`: one engine per node instead, {node: (its config, its stages)}, each request sent to the
    engine the bundle's plan routes its variant to (`planc.runtime.router.RoutedEngines`)."""
    torch.set_num_threads(options.threads)
    metrics = Metrics()
    names = {b["key"]: f"{b['name']}#{b['key'][:8]}" for b in bundle.manifest["blocks"]}
    kernels = kernel_selection(bundle, options)

    def make(cfg: EngineConfig, own_stages: Optional[list]) -> Engine:
        stats = StepStats(on_batch=lambda key, size, nv: metrics.on_batch(names[key], size, nv))
        return Engine(bundle, cfg, stats, stages=own_stages, kernels=kernels)

    if nodes:
        engine = RoutedEngines({k: make(cfg, st) for k, (cfg, st) in nodes.items()}, bundle.plan.routes)
    else:
        engine = make(config or engine_config(bundle, options), stages)
    by_dir: dict[str, TextCodec] = {}
    codecs = {}
    for name, v in bundle.variants.items():
        if v["tokenizer"] not in by_dir:
            by_dir[v["tokenizer"]] = TextCodec(bundle.root / v["tokenizer"])
        codecs[name] = by_dir[v["tokenizer"]]
    return ServerState(bundle, engine, codecs, tenant_keys(bundle), metrics)


def build_app(state: ServerState) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        thread = threading.Thread(target=state.engine.run, args=(state.stop,), name="planc-engine", daemon=True)
        thread.start()
        yield
        state.stop.set()
        thread.join(timeout=10)

    app = FastAPI(title="planc", lifespan=lifespan)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics() -> Response:
        state.metrics.kv_usage.set(state.engine.kv_usage())
        state.metrics.preemptions.set(state.engine.stats.preemptions)
        state.metrics.waiting.set(state.engine.num_waiting)
        state.metrics.running.set(len(state.engine.running))
        return PlainTextResponse(state.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        allowed = _authorize(state, request)
        data = [{"id": name, "object": "model", "created": 0, "owned_by": "planc", "kind": v["kind"]}
                for name, v in state.bundle.variants.items() if allowed is None or name in allowed]
        return {"object": "list", "data": data}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _generate(state, request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await _generate(state, request, chat=True)

    return app


def _authorize(state: ServerState, request: Request) -> Optional[set[str]]:
    if state.keys is None:
        return None
    header = request.headers.get("authorization", "")
    key = header[7:].strip() if header.lower().startswith("bearer ") else ""
    if key not in state.keys:
        raise ApiError(401, "missing or invalid API key (send `Authorization: Bearer <key>`)", code="invalid_api_key")
    return state.keys[key][1] or set(state.bundle.variants)


async def _generate(state: ServerState, request: Request, chat: bool) -> Response:
    allowed = _authorize(state, request)
    try:
        body = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"malformed JSON body: {exc}") from None
    parsed = parse_request(body, chat, state.codecs, state.engine.config.max_model_len, allowed)
    if len(parsed.prompt_ids) + parsed.params.max_tokens > state.engine.max_tokens_capacity():
        raise ApiError(400, f"prompt + max_tokens needs more KV cache than the server has "
                       f"({state.engine.max_tokens_capacity()} tokens)", "max_tokens", "context_length_exceeded")
    run = _Run(state, parsed, asyncio.get_running_loop())
    try:
        run.seq_id = state.engine.submit(parsed.variant, parsed.prompt_ids, parsed.params, run.sink)
    except QueueFull:
        state.metrics.requests.labels(parsed.variant, "429").inc()
        raise ApiError(429, "the server is at its queue limit; retry shortly", headers={"Retry-After": "1"}) from None
    state.metrics.prompt_tokens.labels(parsed.variant).inc(len(parsed.prompt_ids))
    if parsed.stream:
        return StreamingResponse(run.stream(request), media_type="text/event-stream")
    return JSONResponse(await run.collect(request))


class _EventPump:
    """Hands engine events to the requests' queues on the event loop with one loop wake-up per burst
    (an engine step emits a token for every running sequence), not one per token: each wake-up is a
    write to the loop's self-pipe and a turn of the loop, taken under the GIL the engine needs."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.lock = threading.Lock()
        self.pending: list[tuple[asyncio.Queue, Event]] = []

    def put(self, queue: asyncio.Queue, event: Event) -> None:  # engine thread
        with self.lock:
            self.pending.append((queue, event))
            if len(self.pending) > 1:
                return  # a wake-up is already on its way and will take this one too
        self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:  # event loop
        with self.lock:
            batch, self.pending = self.pending, []
        for queue, event in batch:
            queue.put_nowait(event)


class _Run:
    """One request in flight: engine events in, text and metrics out."""

    def __init__(self, state: ServerState, req: GenerationRequest, loop: asyncio.AbstractEventLoop):
        self.state, self.req, self.loop = state, req, loop
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        if state.pump is None or state.pump.loop is not loop:
            state.pump = _EventPump(loop)  # the server's loop, known once it runs
        self.pump = state.pump
        self.detok = Detokenizer(state.codecs[req.variant], req.params.stop)
        self.seq_id = -1
        self.rid = ("chatcmpl-" if req.chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.start = time.monotonic()
        self.first: Optional[float] = None
        self.count = 0
        self.done = False

    def sink(self, event: Event) -> None:  # engine thread
        self.pump.put(self.events, event)

    async def next_piece(self, request: Request) -> tuple[str, Optional[str]]:
        """(text delta, finish reason or None); aborts the sequence if the client has gone."""
        while True:
            try:
                event = self.events.get_nowait()  # the usual case under load: no wait, no timer
                break
            except asyncio.QueueEmpty:
                pass
            try:
                event = await asyncio.wait_for(self.events.get(), timeout=0.5)
                break
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    self.abort()
                    raise asyncio.CancelledError
        if event.finish_reason == "unavailable":  # a stage stayed down: the request may succeed later
            self._finish("error", status="503")
            raise ApiError(503, f"the model is temporarily unavailable: {event.error}; retry shortly",
                           code="stage_unavailable", headers={"Retry-After": "2"})
        if event.error is not None and event.finish_reason == "error":
            self._finish("error", status="500")
            raise ApiError(500, f"the engine failed on this request: {event.error}")
        if event.token_id is not None:
            self._token()
            text = self.detok.add(event.token_id)
            if self.detok.stopped:
                self.abort()
                return text, self._finish("stop")
            return text, None
        return self.detok.flush(), self._finish(event.finish_reason or "stop")

    def _token(self) -> None:
        now = time.monotonic()
        self.count += 1
        if self.first is None:
            self.first = now
            self.state.metrics.ttft.labels(self.req.variant).observe(now - self.start)

    def _finish(self, reason: str, status: str = "200") -> str:
        if not self.done:
            self.done = True
            m, v = self.state.metrics, self.req.variant
            m.generation_tokens.labels(v).inc(self.count)
            if self.first is not None and self.count > 1:
                m.tpot.labels(v).observe((time.monotonic() - self.first) / (self.count - 1))
            m.requests.labels(v, status).inc()
        return reason

    def abort(self) -> None:
        if not self.done:
            self.state.engine.abort(self.seq_id)

    def usage(self) -> dict:
        return usage_of(len(self.req.prompt_ids), self.count)

    async def collect(self, request: Request) -> dict:
        parts = []
        while True:
            text, finish = await self.next_piece(request)
            parts.append(text)
            if finish:
                return completion_body(self.rid, self.req.variant, "".join(parts), finish, self.req.chat, self.usage())

    async def stream(self, request: Request) -> AsyncIterator[str]:
        chat, variant = self.req.chat, self.req.variant
        try:
            if chat:
                yield _sse(completion_body(self.rid, variant, "", None, True, None, delta=True, first=True))
            while True:
                try:
                    text, finish = await self.next_piece(request)
                except ApiError as exc:  # headers are sent: report in-band, as OpenAI's stream does
                    yield _sse(exc.body())
                    break
                if text or finish:
                    yield _sse(completion_body(self.rid, variant, text, finish, chat, None, delta=chat))
                if finish:
                    break
            if self.req.include_usage:
                body = completion_body(self.rid, variant, "", None, chat, self.usage(), delta=chat)
                body["choices"] = []
                yield _sse(body)
            yield "data: [DONE]\n\n"
        finally:
            self.abort()  # client gone mid-stream (generator closed): free the KV now


def _sse(body: dict) -> str:
    return f"data: {json.dumps(body)}\n\n"


class GracefulServer(uvicorn.Server):
    """SIGTERM: stop accepting, let in-flight requests finish (up to the timeout), exit 0.

    uvicorn re-raises the signal after its graceful shutdown, which would end the process with
    status -15; a server that drained cleanly on SIGTERM has done what was asked of it.
    """

    def handle_exit(self, sig, frame) -> None:
        if sig == signal.SIGTERM and not self.should_exit:
            sys.stdout.write("planc: SIGTERM, finishing in-flight requests\n")
            sys.stdout.flush()
        super().handle_exit(sig, frame)
        if sig == signal.SIGTERM and sig in self._captured_signals:
            self._captured_signals.remove(sig)


def serve_forever(state: ServerState, sock: socket.socket, shutdown_timeout: float) -> None:
    config = uvicorn.Config(build_app(state), log_level="warning", timeout_graceful_shutdown=shutdown_timeout,
                            access_log=False)
    GracefulServer(config).run(sockets=[sock])
