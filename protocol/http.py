"""aiohttp pieces shared by the router and the worker: OpenAI-style error middleware, JSON body parsing, SSE."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, Protocol, TypeVar

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic import BaseModel, ValidationError

from protocol.errors import APIError, error_body, from_validation_error
from protocol.limits import LIMITS, Limits, check_json_depth, too_deep
from protocol.openapi import openapi_document

log = logging.getLogger("prefixroute.http")
M = TypeVar("M", bound=BaseModel)

SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
SSE_DONE = b"data: [DONE]\n\n"


def json_error(status: int, message: str, *, param: str | None = None, code: str | None = None,
               headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(error_body(status, message, param=param, code=code), status=status, headers=headers)


@web.middleware
async def error_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """Every failure leaves as an OpenAI error body: ours, aiohttp's (404, 405, 413) or an unexpected one."""
    try:
        return await handler(request)
    except APIError as exc:
        resp = web.json_response(exc.body(), status=exc.status, headers=exc.headers)
        if exc.status == 408 and not request.content.is_eof():
            # A slow sender: answer, then close at once instead of lingering up to 10 s for the rest of its body.
            resp.force_close()
            await resp.prepare(request)
            await resp.write_eof()
            request.protocol.force_close()
        return resp
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        message = {404: f"Unknown path {request.path}.", 405: f"Method {request.method} is not allowed here.",
                   413: "Request body is too large."}.get(exc.status, exc.reason)
        code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(exc.status)
        return json_error(exc.status, message, code=code)
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return json_error(500, "Internal server error.", code="internal_error")


_DEFAULT_LIMITS = Limits()


async def read_json(request: web.Request, limits: Limits | None = None) -> dict[str, Any]:
    """The request body as a JSON object, or a 400 saying why not (413 comes from the size limit, 408 from a body
    that does not arrive within body_timeout_s). `limits`: the app's (given by a caller that holds them, as
    request.config_dict builds a mapping on each access)."""
    if limits is None:
        limits = request.config_dict.get(LIMITS, _DEFAULT_LIMITS)
    try:
        if request.content.is_eof():  # the whole body came with the head (most do): nothing to wait for
            raw = await request.read()
        else:
            async with asyncio.timeout(limits.body_timeout_s):
                raw = await request.read()
    except TimeoutError:
        raise APIError(408, f"The request body did not arrive within {limits.body_timeout_s:g} s.",
                       code="body_timeout") from None
    except web.RequestPayloadError:  # e.g. a Content-Encoding: gzip body that does not inflate
        raise APIError(400, "The request body could not be read (its content or transfer encoding is broken).",
                       code="invalid_body") from None
    if not raw:
        raise APIError(400, "Request body is empty; a JSON object is required.", code="invalid_json")
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        if "depth limit" in str(exc) or "recursion" in str(exc):
            raise too_deep(limits.max_json_depth) from None
        raise APIError(400, f"Request body is not valid JSON: {exc}.", code="invalid_json") from None
    check_json_depth(raw, limits.max_json_depth, obj)
    if not isinstance(obj, dict):
        raise APIError(400, "Request body must be a JSON object.", code="invalid_json")
    return obj


def parse_model(cls: type[M], obj: dict[str, Any]) -> M:
    try:
        return cls.model_validate(obj)
    except ValidationError as exc:
        raise from_validation_error(exc) from None


def sse(payload: BaseModel | dict[str, Any]) -> bytes:
    data = payload.model_dump_json() if isinstance(payload, BaseModel) else json.dumps(payload)
    return b"data: " + data.encode() + b"\n\n"


class OpenAISurface(Protocol):
    """The endpoints that the worker and the router both serve."""

    async def chat_completions(self, request: web.Request) -> web.StreamResponse: ...
    async def completions(self, request: web.Request) -> web.StreamResponse: ...
    async def models(self, request: web.Request) -> web.StreamResponse: ...
    async def health(self, request: web.Request) -> web.StreamResponse: ...
    async def prometheus(self, request: web.Request) -> web.StreamResponse: ...


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(openapi_document())


def openai_app(surface: OpenAISurface, max_body_bytes: int, limits: Limits | None = None) -> web.Application:
    app = web.Application(middlewares=[error_middleware], client_max_size=max_body_bytes)
    app[LIMITS] = limits or _DEFAULT_LIMITS
    app.router.add_get("/openapi.json", openapi)
    app.router.add_post("/v1/chat/completions", surface.chat_completions)
    app.router.add_post("/v1/completions", surface.completions)
    app.router.add_get("/v1/models", surface.models)
    app.router.add_get("/health", surface.health)
    app.router.add_get("/metrics", surface.prometheus)
    return app


def metrics_response(registry: CollectorRegistry) -> web.Response:
    return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})
