"""Text in and out of a variant: prompt encoding, chat templates, incremental detokenizing, stop strings."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from jinja2.sandbox import ImmutableSandboxedEnvironment

from planc.models.tokenizer import chat_template, load_tokenizer, tokenizer_config


class TextCodec:
    """The tokenizer of one variant (loaded once per distinct tokenizer directory)."""

    def __init__(self, directory: Path):
        self.tokenizer = load_tokenizer(directory)
        cfg = tokenizer_config(directory)
        self.bos_token = _token_text(cfg.get("bos_token"))
        self.eos_token = _token_text(cfg.get("eos_token"))
        source = chat_template(directory)
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        self.chat = env.from_string(source) if source else None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def render_chat(self, messages: list[dict]) -> Optional[str]:
        if self.chat is None:
            return None
        return self.chat.render(messages=messages, add_generation_prompt=True, bos_token=self.bos_token or "",
                                eos_token=self.eos_token or "")


def _token_text(token) -> Optional[str]:
    return token.get("content") if isinstance(token, dict) else token


class Detokenizer:
    """Turns a growing list of output ids into text deltas, cutting at the first stop string.

    Text that may still become part of a stop string, or an incomplete UTF-8 character, is held
    back until the next token decides it. Each token costs O(1): only the ids since the last
    complete text are decoded, with the ids before them as context (a tokenizer may render a
    token differently at the start of a text, e.g. dropping its leading space).
    """

    def __init__(self, codec: TextCodec, stop: list[str]):
        self.codec, self.stop = codec, stop
        self.ids: list[int] = []
        self.text = ""
        """Text of the ids up to `_read` (complete characters only)."""
        self._prefix = 0
        self._read = 0
        """ids[_prefix:_read] decode to the end of `text`: the context the next ids are decoded in."""
        self.emitted = 0
        self.stopped = False

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        searched = len(self.text)
        tail = self._pending_text()
        if tail and not tail.endswith("\ufffd"):  # complete characters: take them into the text
            self.text += tail
            self._prefix, self._read = self._read, len(self.ids)
        text = self.text
        for s in self.stop:
            at = text.find(s, max(0, searched - len(s) + 1))
            if at != -1:
                self.stopped = True
                return self._emit(text[:at])
        safe = len(text)
        for s in self.stop:
            for k in range(min(len(s) - 1, safe), 0, -1):
                if text.endswith(s[:k]):
                    safe -= k
                    break
        return self._emit(text[:safe])

    def flush(self) -> str:
        return "" if self.stopped else self._emit(self.text + self._pending_text())

    def _pending_text(self) -> str:
        """What the ids after `_read` add to the text (may end in an incomplete character)."""
        if self._read == len(self.ids):
            return ""
        before = self.codec.decode(self.ids[self._prefix:self._read])
        return self.codec.decode(self.ids[self._prefix:])[len(before):]

    def _emit(self, text: str) -> str:
        delta = text[self.emitted:] if len(text) > self.emitted else ""
        self.emitted = max(self.emitted, len(text))
        return delta
