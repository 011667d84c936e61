"""aiohttp pieces shared by the router and the worker: OpenAI-style error middleware, JSON body parsing, SSE."""

from __future__ import annotations

import json
import logging
from typing import Any, Protocol, TypeVar

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic import BaseModel, ValidationError

from protocol.errors import APIError, error_body, from_validation_error

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
        return web.json_response(exc.body(), status=exc.status, headers=exc.headers)
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


async def read_json(request: web.Request) -> dict[str, Any]:
    """The request body as a JSON object, or a 400 saying why not (413 comes from the size limit)."""
    raw = await request.read()
    if not raw:
        raise APIError(400, "Request body is empty; a JSON object is required.", code="invalid_json")
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise APIError(400, f"Request body is not valid JSON: {exc}.", code="invalid_json") from None
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


def openai_app(surface: OpenAISurface, max_body_bytes: int) -> web.Application:
    app = web.Application(middlewares=[error_middleware], client_max_size=max_body_bytes)
    app.router.add_post("/v1/chat/completions", surface.chat_completions)
    app.router.add_post("/v1/completions", surface.completions)
    app.router.add_get("/v1/models", surface.models)
    app.router.add_get("/health", surface.health)
    app.router.add_get("/metrics", surface.prometheus)
    return app


def metrics_response(registry: CollectorRegistry) -> web.Response:
    return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})
