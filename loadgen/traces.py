"""Workload files: Mooncake traces (one hash id per 512-token block), loadgen's own request JSONL and OpenAI
request logs, told apart and parsed with line-numbered errors; and prompts built so that equal hash ids give
equal token blocks."""

from __future__ import annotations

import gzip
import json
import math
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

TRACE_BLOCK_TOKENS = 512


class TraceError(ValueError):
    """A malformed workload line; the message names the file and line."""


class MooncakeLine(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    timestamp: int = Field(ge=0)
    input_length: int = Field(ge=1)
    output_length: int = Field(ge=0)
    hash_ids: list[int]

    @model_validator(mode="after")
    def _blocks_cover_input(self) -> MooncakeLine:
        need = math.ceil(self.input_length / TRACE_BLOCK_TOKENS)
        if len(self.hash_ids) != need:
            raise ValueError(f"hash_ids has {len(self.hash_ids)} ids but input_length {self.input_length} "
                             f"needs {need}")
        return self


class RecordedRequest(BaseModel):
    """loadgen's own format: an OpenAI request body and when to send it (ms from the start)."""

    model_config = ConfigDict(extra="ignore")

    timestamp: float = Field(ge=0)
    endpoint: Literal["/v1/chat/completions", "/v1/completions"]
    body: dict[str, Any]


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                yield i, line


def _parse(path: Path, i: int, line: str, model: type[BaseModel]) -> Any:
    try:
        return model.model_validate(json.loads(line))
    except json.JSONDecodeError as exc:
        raise TraceError(f"{path}:{i}: not JSON ({exc.msg})") from None
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(map(str, err["loc"]))
        raise TraceError(f"{path}:{i}: {where + ': ' if where else ''}{err['msg'].removeprefix('Value error, ')}") \
            from None


def detect_format(path: Path) -> Literal["mooncake", "requests", "openai"]:
    """From the first line: a Mooncake line (hash_ids), a loadgen request (endpoint and body), or an OpenAI
    request log line (a request body itself, or a body without an endpoint)."""
    for i, line in _lines(path):
        try:
            first = json.loads(line)
        except json.JSONDecodeError:
            raise TraceError(f"{path}:{i}: not JSON") from None
        if isinstance(first, dict) and "hash_ids" in first:
            return "mooncake"
        if isinstance(first, dict) and "body" in first:
            return "requests" if "endpoint" in first else "openai"
        if isinstance(first, dict) and ("messages" in first or "prompt" in first):
            return "openai"
        raise TraceError(f"{path}:{i}: neither a Mooncake line (hash_ids), a loadgen request (body) nor an OpenAI "
                         "request body (messages or prompt)")
    raise TraceError(f"{path}: empty")


def _read(path: Path, model: type[BaseModel], limit: int | None) -> list[Any]:
    out = []
    for i, line in _lines(path):
        out.append(_parse(path, i, line, model))
        if limit is not None and len(out) >= limit:
            break
    return out


def read_mooncake(path: Path, limit: int | None = None) -> list[MooncakeLine]:
    return _read(path, MooncakeLine, limit)


def read_requests(path: Path, limit: int | None = None) -> list[RecordedRequest]:
    return _read(path, RecordedRequest, limit)


class PromptBuilder:
    """Text whose tokens mirror a trace's blocks: block `h` is `block_tokens` words drawn from a seeded stream
    for `h`, every word one token of the tokenizer that never merges with its neighbours (a space-led word), so
    requests sharing k leading hash ids share exactly k x block_tokens leading tokens. `seed` picks another
    stream per hash id (the trace fixes only which blocks are equal, not their words): other token ids, so other
    routing keys and other places on a router's hash ring, with the same sharing. Seed 0 is the original one."""

    def __init__(self, tokenizer: Any, block_tokens: int = TRACE_BLOCK_TOKENS, vocab_size: int = 4096,
                 seed: int = 0):
        self.block_tokens = block_tokens
        self.seed = seed
        vocab = tokenizer.get_vocab()
        words = []
        for tok in sorted(vocab):
            # "Ġ" marks a leading space in byte-level BPE vocabularies
            if tok.startswith("Ġ") and tok[1:].isalpha() and tok[1:].islower() and 3 <= len(tok) - 1 <= 8:
                w = " " + tok[1:]
                if tokenizer(w, add_special_tokens=False).input_ids == [vocab[tok]]:
                    words.append(w)
            if len(words) >= vocab_size:
                break
        if len(words) < 256:
            raise ValueError("the tokenizer has too few single-token words to build trace prompts")
        self.words = words
        self._blocks: dict[int, list[str]] = {}

    def block(self, h: int) -> list[str]:
        b = self._blocks.get(h)
        if b is None:
            b = random.Random(h * 2654435761 + 97 + (self.seed << 64)).choices(self.words, k=self.block_tokens)
            if len(self._blocks) < 200_000:
                self._blocks[h] = b
        return b

    def scaled_length(self, input_length: int) -> int:
        return max(1, math.ceil(input_length * self.block_tokens / TRACE_BLOCK_TOKENS))

    def prompt(self, line: MooncakeLine) -> str:
        n = self.scaled_length(line.input_length)
        words: list[str] = []
        for h in line.hash_ids:
            words.extend(self.block(h))
            if len(words) >= n:
                break
        return "".join(words[:n])
