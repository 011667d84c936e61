"""The routing key and the session key of a request.

Routing key = keyed blake2b(tenant key; prompt_cache_key, first P token ids of the rendered prompt). Only as
many characters as P tokens need are tokenized, so the cost does not grow with the prompt; repeated prefixes
hit a small LRU of tokenizations. The session key names a conversation, so its turns can follow its cache: an
explicit identity, else the conversation's opening (chat: up to the end of the first user message;
completions: the first S tokens).
"""

from __future__ import annotations

import time
from array import array
from collections import OrderedDict
from dataclasses import dataclass
from hashlib import blake2b
from typing import Any

from protocol.openai import ChatCompletionRequest, CompletionRequest
from protocol.prompt import chat_messages, render_chat
from router.tenants import Tenant

_CHARS_PER_TOKEN_GUESS = 5  # first window; doubled until it holds more than P tokens


@dataclass(frozen=True)
class RouteKeys:
    key: bytes  # routing key (16 bytes)
    session: bytes  # session key (16 bytes)
    prefix_tokens: int  # how many tokens went into the routing key
    tokenize_s: float

    @property
    def short(self) -> str:
        return self.key.hex()[:12]


def _h(tenant: Tenant, *parts: bytes) -> bytes:
    h = blake2b(key=tenant.key, digest_size=16)
    for p in parts:
        h.update(len(p).to_bytes(4, "little"))
        h.update(p)
    return h.digest()


class PrefixKeyer:
    def __init__(self, tokenizer: Any, prefix_tokens: int, session_tokens: int = 1024, cache_size: int = 4096):
        self.tokenizer = tokenizer
        self.P = prefix_tokens
        self.S = session_tokens
        self._cache: OrderedDict[bytes, list[int]] = OrderedDict()
        self._cache_size = cache_size

    def first_tokens(self, text: str) -> list[int]:
        return self._window(text)[0]

    def _window(self, text: str) -> tuple[list[int], float]:
        """The first P token ids of `text`, tokenizing a window of characters that grows only as needed, and
        the window's characters per token."""
        window = self.P * _CHARS_PER_TOKEN_GUESS
        while True:
            part = text[:window]
            whole = len(part) == len(text)
            ck = blake2b(part.encode(), digest_size=16).digest()
            ids = self._cache.get(ck)
            if ids is None:
                ids = self.tokenizer(part, add_special_tokens=False).input_ids
                self._cache[ck] = ids
                if len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
            else:
                self._cache.move_to_end(ck)
            # The window's last token may be cut mid-word: keep only tokens followed by another one.
            if whole or len(ids) > self.P:
                cpt = len(part) / max(1, len(ids))
                return (ids[: self.P] if whole else ids[: min(self.P, len(ids) - 1)]), cpt
            window *= 2

    def keys(self, tenant: Tenant, req: ChatCompletionRequest | CompletionRequest,
             session_hint: str | None) -> RouteKeys:
        t0 = time.perf_counter()
        pck = (req.prompt_cache_key or "").encode()
        if isinstance(req, ChatCompletionRequest):
            messages = chat_messages(req)
            text = render_chat(self.tokenizer, messages)
            ids = self.first_tokens(text)
            session_src = self._first_user_turn(text, messages)
        else:
            prompt = req.single_prompt()
            # No turns to go by: the opening S tokens stand for the conversation or document (about S x the
            # characters per token measured on the key's own window, so equal openings cut alike, untokenized).
            if isinstance(prompt, str):
                ids, cpt = self._window(prompt)
                session_src = prompt[: int(self.S * cpt)]
            else:
                ids = prompt[: self.P]
                session_src = ",".join(map(str, prompt[: self.S]))
        key = _h(tenant, b"route", pck, array("I", ids).tobytes())
        # Explicit session identity first; else the conversation's opening (system + first user turn, or the
        # first S tokens of a completion prompt), which every later turn of the same conversation repeats.
        explicit = req.prompt_cache_key or req.user or session_hint
        session = _h(tenant, b"session", (explicit or session_src).encode(), b"explicit" if explicit else b"")
        return RouteKeys(key, session, len(ids), time.perf_counter() - t0)

    @staticmethod
    def _first_user_turn(text: str, messages: list[dict[str, str]]) -> str:
        first_user = next((m["content"] for m in messages if m["role"] == "user"), None)
        if first_user is None:
            return text
        end = text.find(first_user)
        return text if end < 0 else text[: end + len(first_user)]
