"""Request limits shared by the router and the worker: JSON nesting depth, body arrival time, `max_tokens`, and
the HTTP server wiring (JSONErrorRunner) that answers a malformed or oversized request head with an OpenAI JSON
error instead of aiohttp's plain text (431 for an oversized line or field), closes a connection whose first head
is too slow with a 408, and turns aiohttp's own 417 (and its 500 on an Expect value that is not UTF-8) into JSON."""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_server import Server
from pydantic import BaseModel, Field

from protocol.errors import APIError, error_body

log = logging.getLogger("prefixroute.http")

class LimitSettings(BaseModel):
    """The request limits router and worker share (their settings classes inherit these fields)."""

    max_body_bytes: int = Field(32 << 20, ge=1024, description="larger request bodies get 413")
    max_json_depth: int = Field(64, ge=1, le=1000, description="deeper nested JSON bodies get 400 json_too_deep")
    max_header_bytes: int = Field(8190, ge=256, description="a longer request line or header field (name and "
                                  "value) gets 431 headers_too_large")
    body_timeout_s: float | None = Field(60.0, gt=0, description="a request body not fully arrived this long after "
                                         "its head gets 408 body_timeout, and so does a new connection whose first "
                                         "request head takes longer (header_timeout); unset: no limit")
    max_prompt_tokens: int | None = Field(None, ge=1, description="longer prompts get 400 context_length_exceeded "
                                          "(the router counts its estimate, a worker the exact tokens); unset: the "
                                          "model's context is the limit")
    max_tokens_limit: int | None = Field(None, ge=1, description="a larger max_tokens or max_completion_tokens gets "
                                         "400 max_tokens_exceeded; unset: the context is the limit")


def add_limit_flags(p: argparse.ArgumentParser) -> None:
    """LimitSettings' command-line flags, for the router's and the worker's parsers."""
    p.add_argument("--max-json-depth", type=int, help="deeper nested JSON bodies get 400")
    p.add_argument("--max-header-bytes", type=int, help="a longer request line or header field gets 431")
    p.add_argument("--body-timeout-s", type=float, help="seconds a request head or body may take to arrive (then 408)")
    p.add_argument("--max-prompt-tokens", type=int, help="longer prompts get 400")
    p.add_argument("--max-tokens-limit", type=int, help="a larger max_tokens gets 400")


@dataclass(frozen=True)
class Limits:
    """What read_json and the request checks enforce; None: no limit."""

    max_json_depth: int = 64
    body_timeout_s: float | None = None
    max_tokens_limit: int | None = None

    @classmethod
    def of(cls, settings: Any) -> Limits:
        return cls(settings.max_json_depth, settings.body_timeout_s, settings.max_tokens_limit)


LIMITS = web.AppKey("prefixroute_limits", Limits)
TIME_LIMIT = "prefixroute.time_limit"  # request key: the router's asyncio.Timeout for request_time_limit_s


def time_limit_hit(request: web.Request) -> bool:
    """In a CancelledError handler: whether the cancel is the request's time limit running out."""
    timer = request.get(TIME_LIMIT)
    return timer is not None and timer.expired()


_SPECIAL = np.zeros(256, dtype=bool)
_SPECIAL[list(b'"\\[]{}')] = True
_OPEN = np.zeros(256, dtype=np.int8)
_OPEN[list(b"[{")] = 1
_OPEN[list(b"]}")] = -1


def json_depth(raw: bytes, chunk: int = 1 << 20) -> int:
    """Deepest nesting of arrays and objects in `raw`, which must be valid JSON (orjson accepted it): brackets
    inside strings do not count. Vectorized (numpy) over the quotes, backslashes and brackets only, `chunk`
    bytes at a time so that memory stays bounded (about 10 x chunk) whatever the body."""
    view = np.frombuffer(raw, dtype=np.uint8)
    depth = deepest = 0
    inside = 0  # 1 while in a string, across chunks
    run = 0  # backslashes that end the previous chunk
    for start in range(0, len(view), chunk):
        a = view[start:start + chunk]
        idx = np.flatnonzero(_SPECIAL[a])
        if idx.size == 0:
            run = 0
            continue
        c = a[idx]
        bs = c == 0x5C
        # cont[k]: element k directly follows a backslash; r[k]: the backslashes right before it
        cont = np.empty(idx.size, dtype=bool)
        cont[0] = run > 0 and idx[0] == 0
        cont[1:] = bs[:-1] & (np.diff(idx) == 1)
        k = np.arange(idx.size)
        last_break = np.maximum.accumulate(np.where(~cont, k, -1))
        r = np.where(last_break >= 0, k - last_break, k + run)
        quote = (c == 0x22) & (r % 2 == 0)
        in_string = (inside + np.cumsum(quote)) & 1
        steps = np.where(in_string == 0, _OPEN[c], 0).astype(np.int64)
        running = depth + np.cumsum(steps)
        deepest = max(deepest, int(running.max()))
        depth = int(running[-1])
        inside = int(in_string[-1])
        run = int(r[-1]) + 1 if bs[-1] and idx[-1] == a.size - 1 else 0
    return deepest


_NOT_PARSED = object()
_WALK_BYTES = 4096
_WALK_CONTAINERS = 512  # a parsed body with more arrays and objects than this is measured by json_depth instead


def value_depth(value: Any, max_depth: int, budget: int = _WALK_CONTAINERS) -> int | None:
    """Deepest nesting of lists and dicts in a parsed JSON value, or a depth past `max_depth` as soon as one is
    seen; None when the value holds more than `budget` lists and dicts (a walk of a wide hostile body would cost
    more than json_depth's scan of its bytes)."""
    if not isinstance(value, (dict, list)):
        return 0
    stack, deepest = [(value, 1)], 0
    while stack:
        budget -= 1
        if budget < 0:
            return None
        v, d = stack.pop()
        if d > deepest:
            deepest = d
            if d > max_depth:
                return d
        for child in (v.values() if isinstance(v, dict) else v):
            if isinstance(child, (dict, list)):
                stack.append((child, d + 1))
    return deepest


def check_json_depth(raw: bytes, max_depth: int, value: Any = _NOT_PARSED) -> None:
    """400 json_too_deep for a body nested deeper than `max_depth`. With the body's parsed `value`, a walk of its
    few lists and dicts decides (a chat request holds a handful), in place of two passes over every byte: a body of
    more than a few KB, where those passes cost more than the walk."""
    if value is not _NOT_PARSED and len(raw) > _WALK_BYTES:
        depth = value_depth(value, max_depth)
        if depth is not None:
            if depth > max_depth:
                raise too_deep(max_depth)
            return
    # Fewer brackets than the limit cannot nest deeper than it: the usual body never needs the scan.
    if raw.count(b"[") + raw.count(b"{") > max_depth and json_depth(raw) > max_depth:
        raise too_deep(max_depth)


def too_deep(max_depth: int) -> APIError:
    return APIError(400, f"The JSON body is nested deeper than {max_depth} levels.", code="json_too_deep")


def check_max_tokens(req: Any, limit: int | None) -> None:
    """A `max_tokens` (or `max_completion_tokens`) above the configured limit is refused, not clipped."""
    if limit is None:
        return
    for name in ("max_completion_tokens", "max_tokens"):
        value = getattr(req, name, None)
        if value is not None and value > limit:
            raise APIError(400, f"'{name}' is {value}; at most {limit} tokens may be requested.",
                           param="max_tokens", code="max_tokens_exceeded")


# ---- the request head: JSON errors from aiohttp's protocol layer ----------------------------------------------


class JSONErrorHandler(RequestHandler):
    """aiohttp answers a request whose head it cannot parse (bad request line, an oversized line or header
    field, too many headers) from `handle_error`, before any middleware runs; this answers it with an OpenAI
    JSON body: 431 `headers_too_large` for an oversized line or field, 400 `invalid_request` otherwise. An
    HTTPException raised before the middlewares (an unknown Expect: 417) becomes JSON in finish_response."""

    head_timeout_s: float | None = None  # set by JSONErrorServer
    _head_timer: Any = None

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        if self.head_timeout_s:
            self._head_timer = self._loop.call_later(self.head_timeout_s, self._head_timed_out)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        super().connection_lost(exc)

    def _head_timed_out(self) -> None:
        """A connection whose first request head has not arrived in time (a slow-header sender, or one that
        sends nothing): 408 and close. aiohttp itself would keep it open for ever."""
        if self._request_count or self.transport is None:
            return
        body = orjson.dumps(error_body(408, f"The request head did not arrive within {self.head_timeout_s:g} s.",
                                       code="header_timeout"))
        self.transport.write(b"HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\nConnection: close"
                             b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        self.force_close()

    def handle_error(self, request: Any, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if status == 500 and isinstance(exc, UnicodeEncodeError) and not request.headers.get("Expect", "").isascii():
            # aiohttp's Expect handling cannot encode its own 417 text for a value that is not UTF-8
            resp = web.json_response(error_body(417, "Unknown Expect header value.", code="expectation_failed"),
                                     status=417)
            resp.force_close()
            return resp
        if status >= 500:
            self.log_exception("Error handling request", exc_info=exc)
        else:  # hostile or broken clients: not worth a traceback in the log
            log.debug("bad request head (%s)", type(exc).__name__ if exc else status)
        if request.writer.output_size > 0:
            raise ConnectionError("Response is sent already, cannot send another response with the error message")
        if isinstance(exc, LineTooLong) or (isinstance(exc, HttpProcessingError) and "Too many headers" in str(exc)):
            status, code = 431, "headers_too_large"
            text = (f"The request line or a header field is larger than {self.max_field_size} bytes, or there are "
                    f"more than {self.max_headers} headers.")
        elif status < 500:
            code, text = "invalid_request", "The HTTP request could not be parsed."
        else:
            code, text = ("timeout", "The request timed out.") if status == 504 else \
                ("internal_error", "Internal server error.")
        resp = web.json_response(error_body(status, text, code=code), status=status)
        resp.force_close()
        return resp

    async def finish_response(self, request: Any, resp: web.StreamResponse,
                              start_time: float | None) -> tuple[web.StreamResponse, bool]:
        # An HTTPException raised outside the middlewares (aiohttp's Expect handling: 417) is sent as it is,
        # in plain text: make it JSON too.
        if isinstance(resp, web.HTTPException) and resp.status >= 400 and not resp.prepared:
            text = resp.text if resp.text and not resp.text.startswith(f"{resp.status}:") else resp.reason
            code = "expectation_failed" if resp.status == 417 else "invalid_request"
            resp = web.json_response(error_body(resp.status, text, code=code), status=resp.status)
        return await super().finish_response(request, resp, start_time)


class JSONErrorServer(Server):
    def __init__(self, *args: Any, head_timeout_s: float | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.head_timeout_s = head_timeout_s

    def __call__(self) -> RequestHandler:
        handler = JSONErrorHandler(self, loop=self._loop, **self._kwargs)
        handler.head_timeout_s = self.head_timeout_s
        return handler


class JSONErrorRunner(web.AppRunner):
    """web.AppRunner whose connections use JSONErrorHandler. Pass `max_line_size`/`max_field_size` as for
    AppRunner (they reach each connection's parser); `head_timeout_s`: a new connection's first request head
    must arrive within it (else 408 and close)."""

    def __init__(self, app: web.Application, *, head_timeout_s: float | None = None, **kwargs: Any):
        super().__init__(app, **kwargs)
        self._head_timeout_s = head_timeout_s

    async def _make_server(self) -> Server:
        s = await super()._make_server()
        return JSONErrorServer(s.request_handler, request_factory=s.request_factory,
                               handler_cancellation=s.handler_cancellation, loop=s._loop,
                               head_timeout_s=self._head_timeout_s, **s._kwargs)


def header_limits(max_header_bytes: int) -> dict[str, int]:
    """The runner keyword arguments for a header size limit: the request line and each header field."""
    return {"max_line_size": max_header_bytes, "max_field_size": max_header_bytes}
