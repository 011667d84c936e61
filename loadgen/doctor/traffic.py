"""The doctor's input: a request log (loadgen request JSONL, an OpenAI request log, or a Mooncake trace) as
requests in arrival order, each prompt tokenized exactly as the worker tokenizes it."""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ValidationError

from loadgen.traces import RecordedRequest, TraceError, _lines, detect_format, read_mooncake
from protocol.errors import APIError
from protocol.openai import ChatCompletionRequest, CompletionRequest
from protocol.prompt import prompt_text

DEFAULT_OUTPUT_TOKENS = 64
_ENDPOINTS = {"/v1/chat/completions": ChatCompletionRequest, "/v1/completions": CompletionRequest}
_BATCH = 512  # texts per tokenizer call
_LOG_KEYS = ("timestamp", "tenant", "prefix_version")  # an OpenAI log line's own keys beside the body's
_CHECK_SPREAD, _CHECK_LONGEST = 32, 4  # requests that check the segment method against whole-text tokenization


@dataclass
class Req:
    index: int  # order in the log (sorted by timestamp)
    timestamp_ms: float
    tenant: str  # "" when the log has none
    version: str | None  # prefix version: body.metadata.prefix_version, or a top-level "prefix_version"
    tokens: np.ndarray | None  # int64 prompt token ids as the worker has them; None for Mooncake lines
    hash_ids: list[int] | None  # Mooncake lines only (512-token blocks)
    output_tokens: int  # max_tokens (or Mooncake output_length); DEFAULT_OUTPUT_TOKENS when absent
    salt: str | None  # body["cache_salt"], else the tenant when there is one (tenants never share), else None
    input_length: int = 0  # prompt tokens: len(tokens), or the Mooncake line's input_length


@dataclass
class Traffic:
    requests: list[Req]
    source: Literal["requests", "openai", "mooncake"]
    tokenize_s: float
    tokenize_method: str = "none"  # "segments:RULE" (cached segments, checked on a sample), "whole", or "none"


def key_tenant(api_key: str) -> str:
    """A tenant name for an API key that does not reveal it."""
    return "key-" + hashlib.sha256(api_key.encode()).hexdigest()[:8]


def _timestamp(where: str, v: Any) -> float | None:
    if v is None:
        return None
    if isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0:
        return float(v)
    if isinstance(v, str):
        try:
            t = datetime.fromisoformat(v)
        except ValueError:
            raise TraceError(f"{where}: timestamp: not an ISO time") from None
        if t.tzinfo is None:
            t = t.replace(tzinfo=timezone.utc)
        return t.timestamp() * 1000
    raise TraceError(f"{where}: timestamp: must be milliseconds (>= 0) or an ISO time")


def _text_field(where: str, raw: dict[str, Any], name: str) -> str | None:
    v = raw.get(name)
    if v is not None and not isinstance(v, str):
        raise TraceError(f"{where}: {name}: must be a string")
    return v


@dataclass
class _Line:
    where: str
    timestamp_ms: float | None
    tenant: str
    version: str | None
    salt: str | None
    output_tokens: int
    request: ChatCompletionRequest | CompletionRequest
    body: dict[str, Any]  # the request body as the log has it (an OpenAI log's own keys taken out)


def _validate(where: str, model: type[BaseModel], data: Any, prefix: str = "") -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = prefix + ".".join(map(str, err["loc"]))
        raise TraceError(f"{where}: {loc + ': ' if loc else ''}{err['msg'].removeprefix('Value error, ')}") from None


def _parse_line(where: str, line: str, source: str) -> _Line:
    try:
        raw = json.loads(line)
    except json.JSONDecodeError as exc:
        raise TraceError(f"{where}: not JSON ({exc.msg})") from None
    if not isinstance(raw, dict):
        raise TraceError(f"{where}: not a JSON object")
    if source == "requests":
        rec = _validate(where, RecordedRequest, raw)
        body, prefix, model = rec.body, "body.", _ENDPOINTS[rec.endpoint]
    else:
        if "endpoint" in raw:
            raise TraceError(f"{where}: a loadgen request (endpoint) in an OpenAI request log")
        body, prefix = (raw["body"], "body.") if "body" in raw else (
            {k: v for k, v in raw.items() if k not in _LOG_KEYS}, "")
        if not isinstance(body, dict):
            raise TraceError(f"{where}: body: must be a JSON object")
        if "messages" not in body and "prompt" not in body:
            raise TraceError(f"{where}: {prefix or 'line: '}neither messages nor prompt")
        model = ChatCompletionRequest if "messages" in body else CompletionRequest
    req = _validate(where, model, body, prefix)
    tenant = _text_field(where, raw, "tenant") or ""
    key = _text_field(where, body, "_api_key")
    if not tenant and key:
        tenant = key_tenant(key)
    version = (req.metadata or {}).get("prefix_version") or _text_field(where, raw, "prefix_version")
    limit = req.token_limit()
    return _Line(where, _timestamp(where, raw.get("timestamp")), tenant, version, req.cache_salt or tenant or None,
                 DEFAULT_OUTPUT_TOKENS if limit is None else limit, req, body)


def _encode(tokenizer: Any, texts: list[str]) -> list[np.ndarray]:
    out: list[np.ndarray] = []
    for i in range(0, len(texts), _BATCH):
        ids = tokenizer(texts[i:i + _BATCH], add_special_tokens=False).input_ids
        out.extend(np.asarray(t, dtype=np.int64) for t in ids)
    return out


# Where a text may be cut, after a newline, each rule exact for a family of byte-level pre-tokenizer regexes,
# tried in this order: GPT-2/SmolLM ("\s+(?!\S)|\s+": a newline run before a word pre-tokenizes as all but its
# last newline, then the last), Llama 3 ("\s*[\r\n]+": a newline run is one pre-token), then the rule both obey.
# Each alternative starts with a literal so that the regex engine scans for its first characters (7x faster).
_CUTS = {"gpt2": r"\n(?=\n\S)|\n(?<=\S\n)(?=\S)", "llama3": r"\n(?=\S)", "lone": r"\n(?<=\S\n)(?=\S)"}


def _splitter(tokenizer: Any, cut: str) -> re.Pattern[str]:
    """Matches the tokenizer's added tokens (matched before BPE: a text is cut before and after each) and the
    newlines after which the rule `cut` cuts. Non-whitespace is tested the Python way, which Rust's \\S includes."""
    added = sorted({t for t in getattr(tokenizer, "added_tokens_encoder", {}) if t}, key=len, reverse=True)
    return re.compile("|".join([*map(re.escape, added), _CUTS[cut]]))


def _segments(split: re.Pattern[str], text: str) -> list[str]:
    cuts = [0]
    for m in split.finditer(text):
        if m.group() != "\n":  # an added token
            cuts.append(m.start())
        cuts.append(m.end())
    cuts.append(len(text))
    return [text[i:j] for i, j in zip(cuts, cuts[1:]) if j > i]


def _by_segments(texts: list[str], tokenizer: Any, split: re.Pattern[str]) -> list[np.ndarray]:
    """Each text's ids as the concatenation of its segments' ids, each distinct segment tokenized once."""
    parts = [_segments(split, t) for t in texts]
    distinct = list(dict.fromkeys(p for ps in parts for p in ps))
    cache = dict(zip(distinct, _encode(tokenizer, distinct)))
    empty = np.zeros(0, dtype=np.int64)
    return [np.concatenate([cache[p] for p in ps]) if ps else empty for ps in parts]


def _check_sample(texts: list[str]) -> list[int]:
    """Indices of the texts that check the segment method: spread evenly over the log, plus the longest few."""
    n = len(texts)
    spread = {round(k * (n - 1) / max(_CHECK_SPREAD - 1, 1)) for k in range(min(n, _CHECK_SPREAD))}
    longest = sorted(range(n), key=lambda i: len(texts[i]), reverse=True)[:_CHECK_LONGEST]
    return sorted(spread | set(longest))


def tokenize_texts(texts: list[str], tokenizer: Any) -> tuple[list[np.ndarray], str]:
    """The ids tokenizer(text, add_special_tokens=False) gives each text, and the method used: "segments:RULE"
    for the first cut rule (_CUTS) whose cached segments give identical ids on a sample of whole texts, else
    "whole"."""
    if not texts:
        return [], "none"
    check = [texts[i] for i in _check_sample(texts)]
    whole: list[np.ndarray] | None = None
    for cut in _CUTS:
        split = _splitter(tokenizer, cut)
        if not any(len(_segments(split, t)) > 1 for t in check):
            continue  # nothing cut, nothing tested
        whole = whole if whole is not None else _encode(tokenizer, check)
        if all(np.array_equal(a, b) for a, b in zip(_by_segments(check, tokenizer, split), whole)):
            return _by_segments(texts, tokenizer, split), f"segments:{cut}"
    return _encode(tokenizer, texts), "whole"


def _tokenize(lines: list[_Line], tokenizer: Any) -> tuple[list[np.ndarray], str]:
    """Each line's prompt token ids, rendered and tokenized as worker.server's _prepare does, and the method
    (tokenize_texts)."""
    out: list[np.ndarray | None] = [None] * len(lines)
    texts: list[tuple[int, str]] = []
    for k, ln in enumerate(lines):
        try:
            prompt = prompt_text(tokenizer, ln.request)
        except APIError as exc:
            raise TraceError(f"{ln.where}: {exc.message}") from None
        except ValidationError as exc:  # a malformed content part (ChatMessage.text)
            raise TraceError(f"{ln.where}: messages: {exc.errors()[0]['msg']}") from None
        if isinstance(prompt, str):
            texts.append((k, prompt))
        else:
            out[k] = np.asarray(prompt, dtype=np.int64)
    ids, method = tokenize_texts([t for _, t in texts], tokenizer)
    for (k, _), toks in zip(texts, ids):
        out[k] = toks
    for ln, toks in zip(lines, out):
        if toks is None or toks.size == 0:
            raise TraceError(f"{ln.where}: the prompt is empty")
    return out, method  # type: ignore[return-value]


def _parse_all(path: Path, source: str, limit: int | None) -> list[_Line]:
    parsed: list[_Line] = []
    for i, line in _lines(path):
        parsed.append(_parse_line(f"{path}:{i}", line, source))
        if limit is not None and len(parsed) >= limit:
            break
    timed = [ln.timestamp_ms is not None for ln in parsed]
    if any(timed) and not all(timed):
        first = parsed[timed.index(False)]
        raise TraceError(f"{first.where}: timestamp: missing where other lines have one")
    return parsed


def read_openai_log(path: Path, limit: int | None = None) -> list[RecordedRequest]:
    """An OpenAI request log as loadgen requests to replay, in timestamp order (one a second in file order when
    it has no timestamps); the log's `tenant` and `prefix_version` keys are not sent."""
    out = []
    for k, ln in enumerate(_parse_all(Path(path), "openai", limit)):
        endpoint = "/v1/chat/completions" if isinstance(ln.request, ChatCompletionRequest) else "/v1/completions"
        out.append(RecordedRequest(timestamp=ln.timestamp_ms if ln.timestamp_ms is not None else 1000.0 * k,
                                   endpoint=endpoint, body=ln.body))
    return sorted(out, key=lambda r: r.timestamp)


def load_traffic(path: Path, tokenizer: Any, limit: int | None = None) -> Traffic:
    """The first `limit` lines of the log (all by default), sorted by timestamp (stable). A log whose lines carry
    no timestamp at all is taken as one request a second in file order."""
    path = Path(path)
    source = detect_format(path)
    if source == "mooncake":
        lines = read_mooncake(path, limit)
        reqs = [Req(0, float(m.timestamp), "", None, None, list(m.hash_ids), m.output_length, None, m.input_length)
                for m in lines]
        return Traffic(_ordered(reqs), source, 0.0)
    parsed = _parse_all(path, source, limit)
    t0 = time.perf_counter()
    tokens, method = _tokenize(parsed, tokenizer)
    tokenize_s = time.perf_counter() - t0
    reqs = [Req(0, ln.timestamp_ms if ln.timestamp_ms is not None else 1000.0 * k, ln.tenant, ln.version, toks, None,
                ln.output_tokens, ln.salt, int(toks.size)) for k, (ln, toks) in enumerate(zip(parsed, tokens))]
    return Traffic(_ordered(reqs), source, tokenize_s, method)


def _ordered(reqs: list[Req]) -> list[Req]:
    reqs = sorted(reqs, key=lambda r: r.timestamp_ms)
    for i, r in enumerate(reqs):
        r.index = i
    return reqs
