"""The routing key and the session key of a request.

Routing key = keyed blake2b(tenant key; prompt_cache_key, first P token ids of the rendered prompt). Only as
many characters as P tokens need are tokenized, and a chat is rendered only through the messages those P tokens
need (and at least through its first user message), so later turns cost nothing; repeated prefixes hit a small
LRU of tokenizations. The session key names a conversation, so its turns can follow its cache: an explicit
identity, else the conversation's opening (chat: the template's rendering of the messages up to and including
the first user message; completions: the first S tokens).

Cost per request: tokenization O(P); rendering and hashing O(opening + the messages that complete P tokens).
"""

from __future__ import annotations

import time
from array import array
from collections import OrderedDict
from dataclasses import dataclass
from functools import cached_property
from hashlib import blake2b
from typing import Any

from protocol.errors import APIError
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
        ids, _ = self._window(text)
        assert ids is not None
        return ids

    def _window(self, text: str, complete: bool = True) -> tuple[list[int] | None, float]:
        """The first P token ids of `text`, tokenizing a window of characters that grows only as needed, and
        the window's characters per token. For a text that is only the start of the prompt (`complete` false)
        and holds no more than P tokens, None: the caller must extend it."""
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
            cpt = len(part) / max(1, len(ids))
            if whole and complete:
                return ids[: self.P], cpt
            # The window's last token may be cut mid-word (or merge with what follows the text): keep only
            # tokens followed by another one.
            if len(ids) > self.P:
                return ids[: self.P], cpt
            if whole:
                return None, cpt
            window *= 2

    def keys(self, tenant: Tenant, req: ChatCompletionRequest | CompletionRequest,
             session_hint: str | None) -> RouteKeys:
        t0 = time.perf_counter()
        pck = (req.prompt_cache_key or "").encode()
        if isinstance(req, ChatCompletionRequest):
            ids, session_src = self._chat(chat_messages(req))
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

    def _chat(self, messages: list[dict[str, str]]) -> tuple[list[int], str]:
        """The first P token ids of the rendered chat and its opening (the rendering of the messages through the
        first user message), rendering no more messages than those need."""
        n = len(messages)
        first_user = next((i for i, m in enumerate(messages) if m["role"] == "user"), n - 1)
        opening = render_chat(self.tokenizer, messages[: first_user + 1], add_generation_prompt=False)
        if self._prefix_stable:
            k, text = first_user + 1, opening
            while True:
                ids, _ = self._window(text, complete=False)
                if ids is not None:
                    return ids, opening
                if k >= n:
                    break
                k = min(n, k + max(1, k // 2))  # geometric, so a long chat takes O(log) renders
                text = render_chat(self.tokenizer, messages[:k], add_generation_prompt=False)
        ids, _ = self._window(render_chat(self.tokenizer, messages))
        assert ids is not None
        return ids, opening

    @cached_property
    def _prefix_stable(self) -> bool:
        """Whether this chat template renders the first k messages of a conversation as the start of the whole
        conversation's rendering (ChatML, Llama 3, SmolLM2 and most others do). Templates that do not (ones that
        move the system prompt to the last user turn, say) are always rendered whole."""
        probe = [{"role": "system", "content": "s"}, {"role": "user", "content": "u1"},
                 {"role": "assistant", "content": "a1"}, {"role": "user", "content": "u2"}]
        try:
            whole = render_chat(self.tokenizer, probe)
            return all(whole.startswith(render_chat(self.tokenizer, probe[:k], add_generation_prompt=False))
                       for k in range(1, len(probe) + 1))
        except APIError:
            return False
