"""The OpenAPI 3.1 document of the OpenAI surface (GET /openapi.json), generated from the pydantic models that
validate the requests and shape the answers, so it cannot drift from what the server accepts."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from pydantic.json_schema import models_json_schema

from protocol.errors import ErrorBody
from protocol.openai import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    ModelList,
)

_REF = "#/components/schemas/{model}"
_ERROR_STATUSES = {
    "400": "Invalid request (bad JSON, a wrong type or value, too deep, a limit exceeded)",
    "401": "Missing or wrong API key",
    "404": "Unknown model or path",
    "408": "The body did not arrive in time, or the request ran past its time limit",
    "413": "Request body too large",
    "429": "Rate limited or every worker full (see Retry-After)",
    "431": "Request line or a header field too large",
    "502": "Upstream failure",
    "503": "No healthy worker, overloaded, or shutting down",
}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": _REF.format(model=name)}


def _errors() -> dict[str, Any]:
    return {code: {"description": text, "content": {"application/json": {"schema": _ref("ErrorBody")}}}
            for code, text in _ERROR_STATUSES.items()}


def _completion_op(summary: str, request: str, answer: str, chunk: str) -> dict[str, Any]:
    return {"post": {
        "summary": summary,
        "security": [{"bearer": []}, {}],
        "requestBody": {"required": True, "content": {"application/json": {"schema": _ref(request)}}},
        "responses": {
            "200": {"description": f"{answer}, or with `stream: true` server-sent events, each `data:` a {chunk}, "
                                   "ending with `data: [DONE]`",
                    "content": {"application/json": {"schema": _ref(answer)},
                                "text/event-stream": {"schema": {"type": "string"}}}},
            **_errors()}}}


@lru_cache(maxsize=1)
def openapi_document(title: str = "prefixroute", version: str = "0.1.0") -> dict[str, Any]:
    models = [(m, "validation" if m in (ChatCompletionRequest, CompletionRequest) else "serialization")
              for m in (ChatCompletionRequest, CompletionRequest, ChatCompletion, ChatCompletionChunk, Completion,
                        ModelList, ErrorBody)]
    _, defs = models_json_schema(models, ref_template=_REF)
    schemas = defs.get("$defs", {})
    schemas["Health"] = {"type": "object", "properties": {"status": {"type": "string"}},
                         "required": ["status"], "additionalProperties": True}
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version,
                 "description": "OpenAI-compatible chat and text completions. Every error is an OpenAI error body."},
        "paths": {
            "/v1/chat/completions": _completion_op("Chat completion", "ChatCompletionRequest", "ChatCompletion",
                                                   "ChatCompletionChunk"),
            "/v1/completions": _completion_op("Text completion", "CompletionRequest", "Completion", "Completion"),
            "/v1/models": {"get": {"summary": "Served models", "security": [{"bearer": []}, {}], "responses": {
                "200": {"description": "The models", "content": {"application/json": {"schema": _ref("ModelList")}}},
                "401": _errors()["401"]}}},
            "/health": {"get": {"summary": "Health", "responses": {
                "200": {"description": "Serving", "content": {"application/json": {"schema": _ref("Health")}}},
                "503": {"description": "Not serving (no healthy worker, engine stopped, shutting down)",
                        "content": {"application/json": {"schema": _ref("Health")}}}}}},
        },
        "components": {"schemas": schemas,
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                                      "description": "a tenant's API key (router with tenants)"}}},
    }
