"""Forwarding to a worker over pooled upstream connections (router.upstream): SSE passed through chunk by chunk,
failover to the next candidate when a worker cannot be reached, answers 500/502/503/504 or fails before its first
data chunk (nothing has reached the client yet), never after. Each of those failures counts towards the worker's
failure threshold (a refused connection reaches it at once); consecutive failures at the threshold take the worker
off the ring until a health probe brings it back. They also go to the worker's circuit breaker (router.breaker),
which no health probe closes: only its one half-open trial request does.

Neither httpx nor aiohttp's client here: under 64 concurrent requests httpcore's pool re-checks every pooled
connection (getpeername, readability) on each request, which took 68% of the router's CPU and capped it near 350
requests/s; aiohttp's ClientSession cost 316k instructions a request, more than half of a bare aiohttp proxy's
(bench/router_instructions.py). router.upstream hands out an idle connection in O(1) and parses with llhttp.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator

import orjson
from aiohttp import web

from protocol.engines import PREFIXROUTE
from protocol.errors import APIError
from protocol.http import SSE_DONE, sse
from protocol.limits import time_limit_hit
from router.metrics import RouterMetrics
from router.policies import Decision
from router.upstream import ConnectError, TransportError, UpstreamError, UpstreamPool, UpstreamResponse
from router.workers import Worker, WorkerPool

log = logging.getLogger("prefixroute.router.proxy")

# Retried on the next candidate, and counted as the worker's failures: nothing has reached the client yet.
_RETRYABLE_STATUS = (500, 502, 503, 504)
_JSON = {"Content-Type": "application/json"}


class Proxy:
    def __init__(self, upstream: UpstreamPool, pool: WorkerPool, metrics: RouterMetrics, max_failover: int,
                 on_usage: Callable[[dict, dict[str, str]], None] | None = None):
        self.upstream = upstream
        self.pool = pool
        self.metrics = metrics
        self.max_failover = max_failover
        # Another engine's answer (protocol.engines: it keeps no per-tenant counts as a prefixroute worker does):
        # its `usage` and the request's upstream headers (tenant, key, expected tokens), for the router to count.
        self.on_usage = on_usage
        self._tasks: set[asyncio.Task] = set()  # the handlers forwarding now (cut when shutdown's grace ends)
        self.shutting_down = False

    def cut_all(self) -> int:
        """Shutdown's grace period is over: cancel every request still forwarding. Each handler catches that and
        ends its client's answer with an error the client sees (a 503 body, or an error event and [DONE])."""
        self.shutting_down = True
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        return len(tasks)

    def _cut(self) -> bool:
        """In a CancelledError handler: True when the cancel is shutdown's cut (and is consumed), False when it is
        a client that left or the loop stopping (re-raise)."""
        task = asyncio.current_task()
        if not self.shutting_down or task is None:
            return False
        task.uncancel()
        return True

    async def forward(self, request: web.Request, path: str, body: bytes, decision: Decision,
                      extra_headers: dict[str, str], upstream_headers: dict[str, str] | None = None
                      ) -> web.StreamResponse:
        """`extra_headers` go back to the client; `upstream_headers` go to the worker with the body.

        Nothing goes to the client before the worker's first data chunk (its first token, after prefill), so a
        worker that fails during prefill is retried on the next candidate without the client noticing."""
        up_headers = {**_JSON, **upstream_headers} if upstream_headers else _JSON
        route = decision.reason
        last_error = "no worker could be reached"
        tried = 0
        for attempt, name in enumerate(self._candidates(decision)):
            tried += 1
            w = self.pool.workers.get(name)
            if w is None or (attempt and not w.usable):
                continue
            verdict = self.pool.admit(name)  # its circuit breaker may refuse (open, or its one trial in flight)
            if verdict is None:
                continue
            trial = verdict == "trial"
            if attempt:
                route = "failover"
            # The worker's expected work while this request runs: its prefill until the first streamed byte
            # (a non-streamed answer holds it to the end), its context until the end.
            held = self.pool.acquire(name, decision.prefill, decision.context)
            pending = [decision.prefill]
            settled = False  # the attempt's outcome went to the worker's breaker
            up: UpstreamResponse | None = None
            task = asyncio.current_task()
            self._tasks.add(task)  # type: ignore[arg-type]
            try:
                t0 = time.perf_counter()
                try:
                    up = await self.upstream.post(w.url, path, body, up_headers)
                    if up.status in _RETRYABLE_STATUS:
                        self.metrics.upstream_errors.labels(name, str(up.status)).inc()
                        self.pool.request_failed(name, trial)
                        settled = True
                        last_error = f"worker answered {up.status}"
                        continue
                    first = b""
                    if up.headers.get("content-type", "").startswith("text/event-stream"):
                        first = await up.readany()
                        if not first:
                            raise TransportError("the stream ended before its first chunk")
                except UpstreamError as exc:
                    kind = "connect" if isinstance(exc, ConnectError) else "transport"
                    self.metrics.upstream_errors.labels(name, kind).inc()
                    self.pool.request_failed(name, trial, immediate=kind == "connect")
                    settled = True
                    last_error = f"worker unreachable ({type(exc).__name__})"
                    continue
                waited = time.perf_counter() - t0
                self.metrics.upstream_latency.labels(name).observe(waited)
                slow_s = self.pool.breaker_config.slow_s if self.pool.breaker_config else None
                # Only a stream's first chunk is its first token; a plain answer's headers come at its end.
                if first and slow_s is not None and waited > slow_s:
                    self.pool.request_slow(name, trial)
                else:
                    self.pool.request_ok(name, trial)
                settled = True
                headers = {"x-prefixroute-worker": name, "x-prefixroute-route": route, **extra_headers}
                tail: list[bytes] | None = [] if self.on_usage is not None and w.engine not in (PREFIXROUTE, None) \
                    and up.status == 200 else None
                try:
                    resp = await self._relay(request, name, up, headers, pending, first, tail, held)
                finally:
                    # Also when the handler is cancelled: a client that closes on [DONE] may do so before the
                    # worker's end of stream reaches the router, and the usage it was sent still counts.
                    if tail:
                        self._count_usage(tail, upstream_headers or {})
                self.metrics.requests.labels(route, name, str(up.status)).inc()
                return resp
            except asyncio.CancelledError:
                if not self._cut():
                    raise
                self.metrics.rejected.labels("503").inc()
                raise APIError(503, "The router is shutting down; retry the request.",
                               code="server_shutting_down") from None
            finally:
                self._tasks.discard(task)  # type: ignore[arg-type]
                if not settled:
                    self.pool.request_abandoned(name, trial)
                self.pool.release(name, pending[0], decision.context, held)
                if up is not None:
                    # A fully read answer returns its connection to the pool; anything else (a failure, a client
                    # that left, a cancelled handler) closes it, which makes the worker abort the request.
                    up.release()
        self.metrics.rejected.labels("502").inc()
        raise APIError(502, f"Upstream failure: {last_error}; tried {tried} worker(s).",
                       code="upstream_unavailable")

    def _candidates(self, decision: Decision) -> Iterator[str]:
        """The decision's worker, then its failover candidates, listed only when the first attempt failed."""
        yield decision.worker
        yield from decision.fallbacks(self.max_failover)

    def _count_usage(self, tail: list[bytes], tags: dict[str, str]) -> None:
        """The answer's usage: a plain answer's body, or a stream's last event that carries one (a client that
        asked for stream_options.include_usage); a stream without it is not counted."""
        data = tail[0] if len(tail) == 1 else b"".join(tail)
        if data.lstrip().startswith(b"{"):
            body = data
        else:
            at = data.rfind(b'"usage"')
            start = data.rfind(b"data: ", 0, at) if at >= 0 else -1
            if start < 0:
                return
            body = data[start + 6:data.find(b"\n", at) if data.find(b"\n", at) >= 0 else len(data)]
        try:
            usage = orjson.loads(body).get("usage")
        except (orjson.JSONDecodeError, AttributeError):
            return
        if isinstance(usage, dict):
            self.on_usage(usage, tags)  # type: ignore[misc]

    async def _relay(self, request: web.Request, name: str, up: UpstreamResponse,
                     headers: dict[str, str], pending: list[int], first: bytes,
                     tail: list[bytes] | None = None, held: Worker | None = None) -> web.StreamResponse:
        """`tail`: filled with the plain answer, or a stream's last bytes (for its usage), when not None."""
        ctype = up.headers.get("content-type", "application/json")
        headers["content-type"] = ctype
        if not first:
            try:
                data = await up.read()
            except UpstreamError as exc:
                self.metrics.upstream_errors.labels(name, "read").inc()
                raise APIError(502, f"Upstream failure while reading the answer ({type(exc).__name__}).",
                               code="upstream_error") from None
            if tail is not None:
                tail.append(data)
            return web.Response(body=data, status=up.status, headers=headers)
        self.pool.prefilled(name, pending[0], held)
        pending[0] = 0
        out = web.StreamResponse(status=up.status, headers={**headers, "Cache-Control": "no-cache"})
        await out.prepare(request)
        try:
            await out.write(first)
            if tail is None:
                while chunk := await up.readany():
                    await out.write(chunk)
            else:  # tail[0]: the stream's last bytes so far, whatever ends the relay
                tail.append(first)
                while chunk := await up.readany():
                    tail[0] = tail[0][-4096:] + chunk if len(chunk) < 4096 else chunk
                    await out.write(chunk)
        except ConnectionResetError:
            return out  # the client left; closing the upstream connection makes the worker abort the request
        except (UpstreamError, asyncio.CancelledError) as exc:
            # Bytes are out: no retry. End the stream with an error event the client can see.
            if isinstance(exc, asyncio.CancelledError) and time_limit_hit(request):
                # request_time_limit_s ran out; the router's timeout consumes the cancel when the handler returns
                err = APIError(408, "The request ran past its time limit.", code="request_timeout")
            elif isinstance(exc, asyncio.CancelledError):
                if not self._cut():
                    raise
                err = APIError(503, "The router shut down before the answer was complete; retry the request.",
                               code="server_shutting_down")
            else:
                log.warning("upstream stream from %s broke: %s", name, type(exc).__name__)
                self.metrics.upstream_errors.labels(name, "mid_stream").inc()
                err = APIError(502, "Upstream worker failed mid-stream.", code="upstream_error")
            with contextlib.suppress(ConnectionResetError):
                await out.write(sse(err.body()))
                await out.write(SSE_DONE)
        with contextlib.suppress(ConnectionResetError):  # the client may leave after the last byte
            await out.write_eof()
        return out
