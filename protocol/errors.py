"""The OpenAI error body and the exception that carries it through a handler."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

# OpenAI's error `type` for each HTTP status we answer with.
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    413: "invalid_request_error",
    431: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    502: "upstream_error",
    503: "service_unavailable",
    504: "timeout_error",
}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


class APIError(Exception):
    """Raised anywhere in a request's path; the server turns it into an OpenAI error response."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers  # sent with the error (Retry-After with a 429)

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, param=self.param, code=self.code)


def error_body(status: int, message: str, *, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    detail = ErrorDetail(message=message, type=_TYPES.get(status, "invalid_request_error"), param=param, code=code)
    return ErrorBody(error=detail).model_dump()


def from_validation_error(exc: Any) -> APIError:
    """First problem of a pydantic ValidationError as a 400 naming the offending parameter."""
    errs = exc.errors()
    if not errs:
        return APIError(400, "Invalid request body.")
    first = errs[0]
    loc = ".".join(str(p) for p in first.get("loc", ()))
    msg = first.get("msg", "invalid value")
    return APIError(400, f"Invalid value for '{loc}': {msg}." if loc else msg, param=loc or None, code="invalid_value")
