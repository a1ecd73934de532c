"""OpenAI-compatible request parsing and response bodies (completions and chat completions)."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Optional

from planc.runtime.sampling import SamplingParams
from planc.runtime.text import TextCodec


class ApiError(Exception):
    """An error answered as OpenAI does: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 headers: Optional[dict[str, str]] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def body(self) -> dict:
        kind = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 429: "rate_limit_error"}.get(self.status, "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


@dataclass
class GenerationRequest:
    variant: str
    prompt_ids: list[int]
    params: SamplingParams
    stream: bool
    include_usage: bool
    chat: bool


_UNSUPPORTED = ("logprobs", "top_logprobs", "suffix", "tools", "functions", "logit_bias", "response_format")


def parse_request(body: Any, chat: bool, codecs: dict[str, TextCodec], max_model_len: int,
                  allowed: Optional[set[str]]) -> GenerationRequest:
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
    variant = body.get("model")
    if not isinstance(variant, str) or variant not in codecs:
        raise ApiError(400, f"model {variant!r} is not served here; served: {', '.join(codecs)}", "model",
                       "model_not_found")
    if allowed is not None and variant not in allowed:
        raise ApiError(403, f"this API key may not use model {variant!r}", "model", "model_not_allowed")
    for key in _UNSUPPORTED:
        if body.get(key) not in (None, False, 0, [], {}):
            raise ApiError(400, f"`{key}` is not supported", key)
    for key in ("n", "best_of"):
        if body.get(key, 1) != 1:
            raise ApiError(400, f"`{key}` must be 1", key)
    codec = codecs[variant]
    prompt_ids = _chat_prompt(body, codec) if chat else _completion_prompt(body, codec)
    if not prompt_ids:
        raise ApiError(400, "the prompt is empty", "messages" if chat else "prompt")
    room = max_model_len - len(prompt_ids)
    if room < 1:
        raise ApiError(400, f"the prompt has {len(prompt_ids)} tokens; this model's context is {max_model_len}",
                       "messages" if chat else "prompt", "context_length_exceeded")
    params = _sampling(body, chat, room)
    if len(prompt_ids) + params.max_tokens > max_model_len:
        raise ApiError(400, f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the "
                       f"context of {max_model_len} tokens", "max_tokens", "context_length_exceeded")
    stream = _typed(body, "stream", bool, False)
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, "`stream_options` must be an object", "stream_options")
    return GenerationRequest(variant, prompt_ids, params, stream, bool(options.get("include_usage")), chat)


def _typed(body: dict, key: str, kind: type | tuple, default: Any) -> Any:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) and kind is not bool:
        raise ApiError(400, f"`{key}` has the wrong type", key)
    if not isinstance(value, kind):
        raise ApiError(400, f"`{key}` has the wrong type", key)
    return value


def _completion_prompt(body: dict, codec: TextCodec) -> list[int]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return codec.encode(prompt)
    if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        vocab = codec.tokenizer.get_vocab_size()
        if any(t < 0 or t >= vocab for t in prompt):
            raise ApiError(400, f"token ids must be in [0, {vocab})", "prompt")
        return list(prompt)
    raise ApiError(400, "`prompt` must be a string or a list of token ids (one prompt per request)", "prompt")


def _chat_prompt(body: dict, codec: TextCodec) -> list[int]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "`messages` must be a non-empty list", "messages")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise ApiError(400, f"messages[{i}] needs a role of system, user or assistant", "messages")
        content = m.get("content")
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                raise ApiError(400, f"messages[{i}]: only text content parts are supported", "messages")
            content = "".join(str(p.get("text", "")) for p in content)
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be a string", "messages")
        clean.append({"role": m["role"], "content": content})
    text = codec.render_chat(clean)
    if text is None:
        raise ApiError(400, "this model has no chat template; use /v1/completions", "messages")
    return codec.encode(text, add_special_tokens=False)


def _sampling(body: dict, chat: bool, room: int) -> SamplingParams:
    default_max = room if chat else 16
    max_tokens = _typed(body, "max_completion_tokens", int, None) if chat else None
    max_tokens = max_tokens if max_tokens is not None else _typed(body, "max_tokens", int, default_max)
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else (stop or [])
    top_k = _typed(body, "top_k", int, 0)
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=float(_typed(body, "temperature", (int, float), 1.0)),
        top_p=float(_typed(body, "top_p", (int, float), 1.0)),
        top_k=0 if top_k == -1 else top_k,
        seed=_typed(body, "seed", int, None),
        stop=stop if isinstance(stop, list) else [stop],
        ignore_eos=_typed(body, "ignore_eos", bool, False),
    )
    problem = params.validate()
    if problem:
        raise ApiError(400, problem, problem.split()[0])
    return params


def completion_body(rid: str, variant: str, text: str, finish: Optional[str], chat: bool,
                    usage: Optional[dict], delta: bool = False, first: bool = False) -> dict:
    created = int(time.time())
    if chat:
        if delta:  # the role goes in the first chunk only, as OpenAI streams it
            message = {"role": "assistant", "content": text} if first else {"content": text}
            choice = {"index": 0, "delta": message, "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
                      "logprobs": None}
        kind = "chat.completion.chunk" if delta else "chat.completion"
    else:
        choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
        kind = "text_completion"
    body = {"id": rid, "object": kind, "created": created, "model": variant, "choices": [choice]}
    if usage is not None:
        body["usage"] = usage
    return body


def usage_of(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
