"""Forwarding to a worker with httpx: SSE passed through chunk by chunk, failover to the next candidate when
a worker cannot be reached or answers 502/503 before anything was streamed, never after."""

from __future__ import annotations

import logging
import time

import httpx
from aiohttp import web

from protocol.errors import APIError, error_body
from protocol.http import SSE_DONE, sse
from router.metrics import RouterMetrics
from router.policies import Decision
from router.workers import WorkerPool

log = logging.getLogger("prefixroute.router.proxy")

_RETRYABLE_STATUS = (502, 503)
_PASS_HEADERS = ("content-type",)


class Proxy:
    def __init__(self, client: httpx.AsyncClient, pool: WorkerPool, metrics: RouterMetrics, max_failover: int):
        self.client = client
        self.pool = pool
        self.metrics = metrics
        self.max_failover = max_failover

    async def forward(self, request: web.Request, path: str, body: bytes, decision: Decision,
                      extra_headers: dict[str, str]) -> web.StreamResponse:
        candidates = [decision.worker] + decision.fallbacks[: self.max_failover]
        route = decision.reason
        last_error = "no worker could be reached"
        for attempt, name in enumerate(candidates):
            w = self.pool.workers.get(name)
            if w is None or (attempt and not w.usable):
                continue
            if attempt:
                route = "failover"
            self.pool.acquire(name)
            try:
                t0 = time.perf_counter()
                try:
                    up = await self.client.send(
                        self.client.build_request("POST", w.url + path, content=body,
                                                  headers={"content-type": "application/json"}),
                        stream=True)
                except httpx.TransportError as exc:
                    kind = "connect" if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout) else "transport"
                    self.metrics.upstream_errors.labels(name, kind).inc()
                    self.pool.mark_failed(name, immediate=kind == "connect")
                    last_error = f"worker unreachable ({type(exc).__name__})"
                    continue
                self.metrics.upstream_latency.labels(name).observe(time.perf_counter() - t0)
                if up.status_code in _RETRYABLE_STATUS:
                    await up.aclose()
                    self.metrics.upstream_errors.labels(name, str(up.status_code)).inc()
                    last_error = f"worker answered {up.status_code}"
                    continue
                headers = {"x-prefixroute-worker": name, "x-prefixroute-route": route, **extra_headers}
                resp = await self._relay(request, name, up, headers)
                self.metrics.requests.labels(route, name, str(up.status_code)).inc()
                return resp
            finally:
                self.pool.release(name)
        self.metrics.rejected.labels("502").inc()
        raise APIError(502, f"Upstream failure: {last_error}; tried {len(candidates)} worker(s).",
                       code="upstream_unavailable")

    async def _relay(self, request: web.Request, name: str, up: httpx.Response, headers: dict[str, str]) -> web.StreamResponse:
        for h in _PASS_HEADERS:
            if h in up.headers:
                headers[h] = up.headers[h]
        if not up.headers.get("content-type", "").startswith("text/event-stream"):
            try:
                data = await up.aread()
            except httpx.HTTPError as exc:
                self.metrics.upstream_errors.labels(name, "read").inc()
                raise APIError(502, f"Upstream failure while reading the answer ({type(exc).__name__}).",
                               code="upstream_error") from None
            finally:
                await up.aclose()
            return web.Response(body=data, status=up.status_code, headers=headers)
        out = web.StreamResponse(status=up.status_code, headers={**headers, "Cache-Control": "no-cache"})
        await out.prepare(request)
        try:
            async for chunk in up.aiter_raw():
                await out.write(chunk)
        except ConnectionResetError:
            return out  # the client left; closing the upstream stream makes the worker abort the request
        except httpx.HTTPError as exc:
            # Bytes are out: no retry. End the stream with an error event the client can see.
            log.warning("upstream stream from %s broke: %s", name, type(exc).__name__)
            self.metrics.upstream_errors.labels(name, "mid_stream").inc()
            await out.write(sse(error_body(502, "Upstream worker failed mid-stream.", code="upstream_error")))
            await out.write(SSE_DONE)
        finally:
            await up.aclose()
        await out.write_eof()
        return out
