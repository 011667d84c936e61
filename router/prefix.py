"""What the router computes of a request: its routing key, its prompt's block hash chain, and an explicit
session identity when the client gives one.

Routing key = keyed blake2b(tenant key; prompt_cache_key, first P token ids of the rendered prompt). Only as
many characters as P tokens need are tokenized, and a chat is rendered only through the messages those P tokens
need, so later turns cost nothing. Repeated prefixes skip the work: the key's token ids are memoized per leading
messages (a hash of their roles and texts, length-prefixed) and per tokenized window, in small LRUs.

Block chain: the prompt's content (a chat's roles and message texts, a completion's text) cut at fixed offsets
and hashed as a chain seeded by the tenant and prompt_cache_key (router.index): what the prefix index matches
against what each worker is expected to hold. Token counts along it are estimated from the bytes per token of
the routing key's own window, so the tokenizer's work stays O(P).

Cost per request: tokenization O(P); rendering O(the messages that complete P tokens); block hashing O(prompt
bytes) at memory speed (xxh3) in O(log prompt) calls.
"""

from __future__ import annotations

import time
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from hashlib import blake2b
from typing import Any

import xxhash

from protocol.errors import APIError
from protocol.openai import ChatCompletionRequest, CompletionRequest
from protocol.prompt import chat_messages, render_chat
from router.index import chain
from router.tenants import Tenant

_CHARS_PER_TOKEN_GUESS = 5  # first window; doubled until it holds more than P tokens
_ESTIMATE_CHARS = 1024  # the least text that bytes per token are estimated from (P = 256 windows hold more)


@dataclass(slots=True)  # not frozen: a frozen dataclass sets each field through object.__setattr__ (18k instructions)
class RouteKeys:
    key: bytes  # routing key (16 bytes)
    session: bytes | None  # explicit session identity (prompt_cache_key, user, x-session-id), if any
    prefix_tokens: int  # how many tokens went into the routing key
    tokenize_s: float
    blocks: Sequence[int] = ()  # the prompt's block hash chain
    block_tokens: Sequence[int] = ()  # estimated prompt tokens up to the end of each block
    prompt_tokens: int = 0  # estimated prompt tokens
    prefix_ids: bytes = b""  # the routing key's token ids as uint32 (router.divergence hashes them; never stored)

    @property
    def short(self) -> str:
        return self.key.hex()[:12]

    def tokens_through(self, blocks: int) -> int:
        """Estimated tokens in the first `blocks` blocks."""
        return self.block_tokens[blocks - 1] if blocks else 0


def _h(tenant: Tenant, *parts: bytes) -> bytes:
    h = blake2b(key=tenant.key, digest_size=16)
    for p in parts:
        h.update(len(p).to_bytes(4, "little"))
        h.update(p)
    return h.digest()


class PrefixKeyer:
    def __init__(self, tokenizer: Any, prefix_tokens: int, block_bytes: int = 256, cache_size: int = 4096):
        self.tokenizer = tokenizer
        self.P = prefix_tokens
        self.block_bytes = block_bytes
        self._cache: OrderedDict[bytes, list[int]] = OrderedDict()  # window text hash -> its token ids
        # leading messages -> (key ids, or None when they hold no more than P tokens; bytes per token; the ids as
        # uint32 bytes)
        self._chats: OrderedDict[bytes, tuple[list[int] | None, float, bytes]] = OrderedDict()
        self._route: OrderedDict[tuple[bytes, bytes, bytes], bytes] = OrderedDict()  # (tenant, pck, ids) -> key
        self._seeds: dict[tuple[bytes, bytes], int] = {}  # (tenant, prompt_cache_key) -> block chain seed
        self._cache_size = cache_size

    def first_tokens(self, text: str) -> list[int]:
        ids, _ = self._window(text, b"")
        assert ids is not None
        return ids

    def _window(self, text: str, scope: bytes, complete: bool = True) -> tuple[list[int] | None, float]:
        """The first P token ids of `text`, tokenizing a window of characters that grows only as needed, and
        the bytes (UTF-8) per token of the text's first _ESTIMATE_CHARS at least (a few tokens alone are a poor
        sample: a chat template's leading special tokens are long). For a text that is only the start of the
        prompt (`complete` false) and holds no more than P tokens, None: the caller must extend it."""
        window = self.P * _CHARS_PER_TOKEN_GUESS
        while True:
            part = text[:window]
            whole = len(part) == len(text)
            ids = self._tokens(part, scope)
            if whole and complete:
                return ids[: self.P], self._bpt(text, part, ids, scope)
            # The window's last token may be cut mid-word (or merge with what follows the text): keep only
            # tokens followed by another one.
            if len(ids) > self.P:
                return ids[: self.P], self._bpt(text, part, ids, scope)
            if whole:
                return None, self._bpt(text, part, ids, scope)
            window *= 2

    def _tokens(self, part: str, scope: bytes) -> list[int]:
        # Memoized per tenant (`scope`, its key): a memo shared by tenants would let one time whether another
        # sent a text before (a warm key is ~0.5 ms faster), the side channel of Gu et al. 2025.
        ck = blake2b(part.encode(), key=scope, digest_size=16).digest()
        ids = self._cache.get(ck)
        if ids is None:
            ids = self.tokenizer(part, add_special_tokens=False).input_ids
            self._cache[ck] = ids
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(ck)
        return ids

    def _bpt(self, text: str, part: str, ids: list[int], scope: bytes) -> float:
        if len(part) < _ESTIMATE_CHARS and len(part) < len(text):
            part = text[:_ESTIMATE_CHARS]
            ids = self._tokens(part, scope)
        return len(part.encode()) / max(1, len(ids))

    def keys(self, tenant: Tenant, req: ChatCompletionRequest | CompletionRequest,
             session_hint: str | None) -> RouteKeys:
        t0 = time.perf_counter()
        pck = (req.prompt_cache_key or "").encode()
        if isinstance(req, ChatCompletionRequest):
            messages = chat_messages(req)
            # Each message's bytes once: its memo digest (_chat) and the block chain's content both read them.
            encoded = [(m["role"].encode(), m["content"].encode()) for m in messages]
            ids, bpt, packed = self._chat(messages, tenant.key, encoded)
            data = b"".join([part for role, content in encoded for part in (role, b"\n", content, b"\x1e")])
        else:
            prompt = req.single_prompt()
            if isinstance(prompt, str):
                ids, bpt = self._window(prompt, tenant.key)
                data = prompt.encode()
            else:
                ids, bpt = prompt[: self.P], 4.0
                data = array("I", prompt).tobytes()
            packed = array("I", ids).tobytes()
        key = self._route_key(tenant, pck, packed)
        seed = self._seeds.get((tenant.key, pck))
        if seed is None:
            if len(self._seeds) >= self._cache_size:
                self._seeds.clear()
            seed = self._seeds[(tenant.key, pck)] = int.from_bytes(_h(tenant, b"blocks", pck)[:8], "little")
        blocks, ends = chain(data, self.block_bytes, seed)
        per = 1 / max(bpt, 1e-6)
        explicit = req.prompt_cache_key or req.user or session_hint
        # surrogateescape: an x-session-id that is not UTF-8 arrives as lone surrogates (aiohttp's decoding)
        session = _h(tenant, b"session", explicit.encode("utf-8", "surrogateescape")) if explicit else None
        return RouteKeys(key, session, len(ids), time.perf_counter() - t0, blocks,
                         [round(e * per) for e in ends], max(len(ids), round(len(data) * per)), packed)

    def _route_key(self, tenant: Tenant, pck: bytes, packed: bytes) -> bytes:
        # Memoized: a chat's `packed` is its memo's own bytes object, whose hash Python keeps, so a repeated
        # prefix costs one dict lookup instead of a keyed blake2b over P token ids.
        k = (tenant.key, pck, packed)
        key = self._route.get(k)
        if key is None:
            key = self._route[k] = _h(tenant, b"route", pck, packed)
            if len(self._route) > self._cache_size:
                self._route.popitem(last=False)
        return key

    def _chat(self, messages: list[dict[str, str]], scope: bytes,
              encoded: list[tuple[bytes, bytes]] | None = None) -> tuple[list[int], float, bytes]:
        """The first P token ids of the rendered chat and their bytes per token, rendering no more messages than
        those need; memoized by the tenant (`scope`) and the leading messages that gave them (`encoded`: each
        message's role and content as UTF-8)."""
        n = len(messages)
        h = xxhash.xxh3_128()
        h.update(scope)
        digests: list[bytes] = []  # digests[k-1]: the first k messages

        def through(k: int) -> bytes:
            while len(digests) < k:
                m = messages[len(digests)]
                for part in encoded[len(digests)] if encoded is not None else (m["role"].encode(),
                                                                              m["content"].encode()):
                    h.update(len(part).to_bytes(8, "little"))
                    h.update(part)
                digests.append(h.digest())
            return digests[k - 1]

        if self._prefix_stable:
            k = 1
            while True:
                d = through(k)
                memo = self._chats.get(d)
                if memo is None:
                    try:
                        text = render_chat(self.tokenizer, messages[:k], add_generation_prompt=False)
                    except APIError:  # a template that refuses a partial conversation: render the whole one
                        break
                    ids, bpt = self._window(text, scope, complete=False)
                    memo = self._memo(d, ids, bpt)  # ids None: these messages hold no more than P tokens
                else:
                    self._chats.move_to_end(d)
                if memo[0] is not None:
                    return memo
                if k >= n:
                    break
                k = min(n, k + max(1, k // 2))  # geometric, so a long chat takes O(log) renders
        whole = b"whole" + through(n)  # the rendering with the generation prompt, never a partial one
        memo = self._chats.get(whole)
        if memo is not None:
            self._chats.move_to_end(whole)
            return memo
        ids, bpt = self._window(render_chat(self.tokenizer, messages), scope)
        assert ids is not None
        return self._memo(whole, ids, bpt)

    def _memo(self, digest: bytes, ids: list[int] | None, bpt: float) -> tuple[Any, float, bytes]:
        out = self._chats[digest] = (ids, bpt, array("I", ids).tobytes() if ids is not None else b"")
        if len(self._chats) > self._cache_size:
            self._chats.popitem(last=False)
        return out

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
