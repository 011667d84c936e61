"""One request inside the engine: its tokens, cache pins, KV, text state and the events it emits."""

from __future__ import annotations

import enum
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from worker.engine.cache import Block
from worker.engine.sampling import SamplingParams

_ids = itertools.count(1)


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class SeqEvent:
    """What the engine tells a request's handler after a step: new text, and the end when it comes."""

    text: str
    finish_reason: str | None
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None or self.error is not None


class TextState:
    """Incremental detokenization with stop strings: emits only text that no stop string can still claim."""

    def __init__(self, decode: Callable[[list[int]], str], stop: list[str]):
        self._decode = decode
        self._stop = stop
        self._emitted = 0
        self.text = ""

    def update(self, token_ids: list[int]) -> tuple[str, bool]:
        """New text to emit for the current output ids, and whether a stop string ended it."""
        text = self._decode(token_ids)
        if self._stop:
            lo = max(0, self._emitted - max(len(s) for s in self._stop))
            hits = [i for s in self._stop if (i := text.find(s, lo)) >= 0]
            if hits:
                self.text = text[: min(hits)]
                return self._flush(len(self.text)), True
        self.text = text
        end = len(text.rstrip("\ufffd"))  # an incomplete UTF-8 sequence waits for the next token
        safe = end
        for s in self._stop:  # hold back a tail that could still grow into a stop string
            for k in range(min(len(s) - 1, end), 0, -1):
                if text[end - k:end] == s[:k]:
                    safe = min(safe, end - k)
                    break
        return self._flush(max(safe, self._emitted)), False

    def finish(self) -> str:
        """Everything still held back, once the sequence ended for another reason."""
        return self._flush(len(self.text))

    def _flush(self, upto: int) -> str:
        out = self.text[self._emitted:upto]
        self._emitted = max(self._emitted, upto)
        return out


@dataclass(eq=False)
class Sequence:
    prompt_ids: list[int]
    params: SamplingParams
    salt: str | None
    sink: Callable[[SeqEvent], None]
    id: int = field(default_factory=lambda: next(_ids))
    output_ids: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    blocks: list[Block] = field(default_factory=list)  # pinned cache blocks, root first
    num_cached_tokens: int = 0
    pages: list[int] = field(default_factory=list)  # block table: the KV pages of its tokens, in order
    num_computed: int = 0  # tokens whose KV is in its pages
    num_prefill: int = 0  # tokens to compute before sampling: the prompt, or prompt + output after preemption
    sampler: Any = None
    text: TextState | None = None
    finish_reason: str | None = None
    arrival: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None

    @property
    def num_prompt(self) -> int:
        return len(self.prompt_ids)

    @property
    def kv_reserve(self) -> int:
        """Tokens of KV set aside at admission: the prompt and a first stretch of output (the buffer grows if the
        answer runs longer)."""
        return self.num_prompt + min(self.params.max_tokens, 256)

    @property
    def prefilling(self) -> bool:
        return self.num_computed < self.num_prefill

    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def event(self, text: str, error: str | None = None) -> SeqEvent:
        return SeqEvent(text, self.finish_reason, self.num_prompt, self.num_cached_tokens,
                        len(self.output_ids), error)
