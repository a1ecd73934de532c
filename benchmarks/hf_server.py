"""The transformers baseline behind an OpenAI-compatible endpoint, so `planc bench --url` drives it.

Every variant of a model.yaml is loaded as its own transformers model (LoRA adapters through peft's
merged model) and requests run one at a time through `generate` (no batching): the "transformers
per request" baseline of issue 3. /v1/completions takes a token-id or text prompt, `max_tokens`,
`temperature` (0 = greedy), `ignore_eos` and `stream` (SSE, one chunk per token, usage last).

    python benchmarks/hf_server.py examples/tiny/model.yaml --port 8001 &
    planc bench --url http://127.0.0.1:8001 --concurrency 1 --num-requests 16 --out hf.json
"""
from __future__ import annotations

import argparse
import asyncio
import json
import socket
import threading
import time
from pathlib import Path

import torch
import uvicorn
import yaml
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse


def load_models(spec_path: Path) -> tuple[dict, object]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec, root = yaml.safe_load(spec_path.read_text()), spec_path.parent
    base = root / spec["base"]["path"]
    models = {spec["base"].get("name", "base"): AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)}
    for v in spec.get("variants", []):
        if v.get("adapter"):
            from peft import PeftModel
            model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
            models[v["name"]] = PeftModel.from_pretrained(model, root / v["adapter"]).merge_and_unload()
        else:
            models[v["name"]] = AutoModelForCausalLM.from_pretrained(root / v["path"], dtype=torch.float32)
    return {k: m.eval() for k, m in models.items()}, AutoTokenizer.from_pretrained(base)


class _Tokens:
    """A generate() streamer that hands each new token id to the event loop (the first put is the prompt)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue):
        self.loop, self.queue, self.prompt_seen = loop, queue, False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            self.loop.call_soon_threadsafe(self.queue.put_nowait, token)

    def end(self) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, None)


def build_app(models: dict, tokenizer) -> FastAPI:
    app, one_at_a_time = FastAPI(), threading.Lock()  # per request: no batching, no overlap

    def generate(model, ids: list[int], body: dict, streamer: _Tokens) -> None:
        n, temperature = int(body.get("max_tokens", 16)), float(body.get("temperature", 1.0))
        x = torch.tensor([ids])
        sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
        with one_at_a_time, torch.no_grad():
            model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n,
                           min_new_tokens=n if body.get("ignore_eos") else 0, streamer=streamer,
                           pad_token_id=tokenizer.pad_token_id or 0, **sampling)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def list_models() -> dict:
        return {"object": "list", "data": [{"id": name, "object": "model"} for name in models]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        if body.get("model") not in models:
            return JSONResponse({"error": {"message": f"model {body.get('model')!r} is not served here"}}, 400)
        prompt = body.get("prompt")
        ids = prompt if isinstance(prompt, list) else tokenizer.encode(prompt)
        queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        job = loop.run_in_executor(None, generate, models[body["model"]], ids, body, _Tokens(loop, queue))
        stream = _stream(queue, job, body, len(ids), tokenizer)
        if body.get("stream"):
            return StreamingResponse(stream, media_type="text/event-stream")
        text, usage, reason = "", None, None
        async for event in stream:
            data = event[6:].strip()
            if data != "[DONE]":
                chunk = json.loads(data)
                text += "".join(c["text"] for c in chunk["choices"])
                reason = next((c["finish_reason"] for c in chunk["choices"] if c["finish_reason"]), reason)
                usage = chunk.get("usage") or usage
        return {"object": "text_completion", "model": body["model"], "usage": usage,
                "choices": [{"index": 0, "text": text, "finish_reason": reason}]}

    return app


async def _stream(queue: asyncio.Queue, job, body: dict, num_prompt: int, tokenizer):
    count, created = 0, int(time.time())
    while (token := await queue.get()) is not None:
        count += 1
        choice = {"index": 0, "text": tokenizer.decode([token]), "finish_reason": None}
        yield f"data: {json.dumps({'object': 'text_completion', 'created': created, 'choices': [choice]})}\n\n"
    await job
    reason = "length" if count >= int(body.get("max_tokens", 16)) else "stop"
    yield f"data: {json.dumps({'choices': [{'index': 0, 'text': '', 'finish_reason': reason}]})}\n\n"
    usage = {"prompt_tokens": num_prompt, "completion_tokens": count, "total_tokens": num_prompt + count}
    yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
    yield "data: [DONE]\n\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("spec", type=Path, help="model.yaml")
    ap.add_argument("--port", type=int, default=8001, help="0 picks a free port")
    args = ap.parse_args()
    torch.set_num_threads(1)
    models, tokenizer = load_models(args.spec)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", args.port))
    print(f"transformers baseline: {', '.join(models)}; listening on http://127.0.0.1:{sock.getsockname()[1]}",
          flush=True)
    uvicorn.Server(uvicorn.Config(build_app(models, tokenizer), log_level="warning")).run(sockets=[sock])


if __name__ == "__main__":
    main()
