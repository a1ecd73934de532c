"""End to end: compile the tiny example, start the real server on 127.0.0.1, query it with the
official openai client, and check outputs token for token against transformers."""
from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
import torch

import planc
from planc.runtime.text import TextCodec
from tests.serving import ServerProcess

openai = pytest.importorskip("openai")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

PROMPTS = {"base": "The quiet river", "legal": "The Tenant shall", "support": "User: Can you tell me about a recipe",
           "chat": "User: Can you tell me about the weather?\nAssistant:"}


@pytest.fixture(scope="module")
def server(tiny_bundle):
    srv = ServerProcess(tiny_bundle)
    yield srv
    assert srv.stop() == 0


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def expected(tiny_example, tiny_bundle):
    """Greedy continuations from transformers (peft's merged model for the LoRA variant)."""
    models = tiny_example.parent / "models"
    codec = TextCodec(planc.Bundle.open(tiny_bundle).tokenizer_dir("base"))
    out = {}
    for variant, prompt in PROMPTS.items():
        path = models / ("base" if variant == "chat" else variant)
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        if variant == "chat":
            model = peft.PeftModel.from_pretrained(model, models / "chat-lora").merge_and_unload()
        ids = codec.encode(prompt)
        gen = model.eval().generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0, len(ids):].tolist()
        out[variant] = codec.decode([t for t in gen if t != 1])
    return out


def test_models_lists_every_variant(client):
    assert sorted(m.id for m in client.models.list().data) == ["base", "chat", "legal", "support"]


def test_greedy_completions_match_transformers(client, expected):
    for variant, prompt in PROMPTS.items():
        r = client.completions.create(model=variant, prompt=prompt, max_tokens=12, temperature=0)
        assert r.choices[0].text == expected[variant], variant
        assert r.usage.completion_tokens <= 12 and r.usage.prompt_tokens > 0


def test_concurrent_requests_of_all_variants_batch_and_stay_exact(client, server, expected):
    before = server.metric("planc_block_mixed_batches_total")
    results: dict[tuple[str, int], str] = {}

    def call(variant: str, i: int) -> None:
        r = client.completions.create(model=variant, prompt=PROMPTS[variant], max_tokens=12, temperature=0)
        results[(variant, i)] = r.choices[0].text

    threads = [threading.Thread(target=call, args=(v, i)) for i in range(3) for v in PROMPTS]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(results) == 12
    assert all(text == expected[v] for (v, _), text in results.items())
    assert server.metric("planc_block_mixed_batches_total") > before  # a shared block ran a mixed batch


def test_streaming_equals_non_streaming(client, expected):
    chunks = list(client.completions.create(model="legal", prompt=PROMPTS["legal"], max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == expected["legal"]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("length", "stop")
    assert chunks[-1].usage.completion_tokens > 0 and chunks[-1].choices == []


def test_chat_completions(client):
    messages = [{"role": "user", "content": "Can you tell me about the weather?"}]
    r = client.chat.completions.create(model="chat", messages=messages, max_tokens=8, temperature=0)
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content
    stream = client.chat.completions.create(model="chat", messages=messages, max_tokens=8, temperature=0,
                                            stream=True)
    deltas = [c.choices[0].delta for c in stream]
    assert deltas[0].role == "assistant"
    assert "".join(d.content or "" for d in deltas) == r.choices[0].message.content


def test_stop_string_and_seed(client, expected):
    words = expected["legal"].split()
    stop = words[1] if len(words) > 1 else words[0]
    r = client.completions.create(model="legal", prompt=PROMPTS["legal"], max_tokens=12, temperature=0, stop=[stop])
    assert stop not in r.choices[0].text and r.choices[0].finish_reason == "stop"
    assert expected["legal"].startswith(r.choices[0].text)
    a, b, c = (client.completions.create(model="support", prompt="The", max_tokens=10, temperature=1.0, seed=s)
               .choices[0].text for s in (7, 7, 8))
    assert a == b and a != c


@pytest.mark.parametrize("body, status, fragment", [
    (b"{not json", 400, "malformed JSON"),
    (json.dumps({"model": "nope", "prompt": "x"}).encode(), 400, "not served here"),
    (json.dumps({"model": "base", "prompt": "x", "temperature": 7}).encode(), 400, "temperature"),
    (json.dumps({"model": "base", "prompt": "x", "n": 2}).encode(), 400, "`n` must be 1"),
    (json.dumps({"model": "base", "prompt": "word " * 400}).encode(), 400, "context"),
    (json.dumps({"model": "base", "prompt": "x", "max_tokens": "many"}).encode(), 400, "max_tokens"),
    (json.dumps({"model": "base", "prompt": "x", "ignore_eos": "yes"}).encode(), 400, "ignore_eos"),
])
def test_bad_requests_get_openai_style_400(server, body, status, fragment):
    r = httpx.post(server.url + "/v1/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status
    err = r.json()["error"]
    assert fragment in err["message"] and err["type"] == "invalid_request_error"


def test_client_disconnect_frees_kv(server):
    with httpx.stream("POST", server.url + "/v1/completions", json={
            "model": "base", "prompt": "The", "max_tokens": 200, "temperature": 0, "ignore_eos": True,
            "stream": True}, timeout=30) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data:")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if server.metric("planc_requests_running") == 0 and server.metric("planc_kv_cache_usage_ratio") == 0:
            break
        time.sleep(0.2)
    assert server.metric("planc_requests_running") == 0
    assert server.metric("planc_kv_cache_usage_ratio") == 0.0
    assert server.metric("planc_generation_tokens_total", variant="base") < 1000


def test_queue_limit_answers_429(tiny_bundle):
    srv = ServerProcess(tiny_bundle, "--max-queue", "1", "--max-running", "1")
    try:
        statuses, headers = [], []

        def call():
            r = httpx.post(srv.url + "/v1/completions", json={"model": "base", "prompt": "The", "max_tokens": 60,
                                                              "ignore_eos": True, "temperature": 0}, timeout=60)
            statuses.append(r.status_code)
            headers.append(r.headers.get("retry-after"))

        threads = [threading.Thread(target=call) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert 429 in statuses and 200 in statuses and set(statuses) <= {200, 429}
        assert "1" in headers
    finally:
        assert srv.stop() == 0


def test_tenants_keys_and_allowed_variants(tiny_example, tmp_path):
    yaml = tiny_example.parent / "tenants.yaml"
    yaml.write_text(tiny_example.read_text() + "tenants:\n  - {name: acme, api_key_env: ACME_KEY, variants: [legal]}\n"
                    "  - {name: ops, api_key_env: OPS_KEY}\n")
    bundle = planc.emit(planc.compile(planc.load(yaml)), out=tmp_path / "bundle")
    srv = ServerProcess(bundle, env={"ACME_KEY": "k-acme", "OPS_KEY": "k-ops"})
    try:
        assert "tenants: 2 API keys" in "".join(srv.banner)
        url = srv.url + "/v1/completions"
        body = {"model": "legal", "prompt": "The", "max_tokens": 2}
        assert httpx.post(url, json=body).status_code == 401
        assert httpx.post(url, json=body, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert httpx.post(url, json=body, headers={"Authorization": "Bearer k-acme"}).status_code == 200
        r = httpx.post(url, json={**body, "model": "base"}, headers={"Authorization": "Bearer k-acme"})
        assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"
        assert httpx.post(url, json={**body, "model": "base"}, headers={"Authorization": "Bearer k-ops"}).status_code == 200
        models = httpx.get(srv.url + "/v1/models", headers={"Authorization": "Bearer k-acme"}).json()["data"]
        assert [m["id"] for m in models] == ["legal"]
    finally:
        assert srv.stop() == 0


def test_sigterm_lets_in_flight_requests_finish(tiny_bundle):
    srv = ServerProcess(tiny_bundle)
    got = {}

    def call():
        r = httpx.post(srv.url + "/v1/completions", json={"model": "base", "prompt": "The", "max_tokens": 40,
                                                          "ignore_eos": True, "temperature": 0}, timeout=60)
        got["status"], got["body"] = r.status_code, r.json()

    t = threading.Thread(target=call)
    t.start()
    time.sleep(0.3)
    code = srv.stop()
    t.join(30)
    assert code == 0
    assert got["status"] == 200 and got["body"]["usage"]["completion_tokens"] == 40
