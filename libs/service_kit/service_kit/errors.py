"""One error shape for every service: OpenAI's `{"error": {"message", "type", "param", "code"}}`.

`type` is the broad kind a client branches on (OpenAI's: `invalid_request_error`,
`authentication_error`, ...), `code` the precise reason (`not_found`, `invalid_value`,
`context_length_exceeded`, ...), `param` the request field at fault, or null. Routes raise
`APIError` (or FastAPI's `HTTPException`); `install` makes every way a request can fail answer in
this shape: HTTP errors, unknown routes (404), wrong methods (405), validation (422, or 400 where
a service speaks OpenAI's dialect), and an over-long body (413). Unhandled exceptions become 500s
in `request_context`, which sits outside the handlers installed here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

MAX_MESSAGE = 2000
# The request part FastAPI puts first in an error's `loc`; `param` names the field without it.
_LOCATIONS = {"body", "query", "path", "header", "cookie"}

_TYPES = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error", 503: "service_unavailable"}
_CODES = {
    400: "bad_request",
    401: "invalid_api_key",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "request_too_large",
    416: "range_not_satisfiable",
    422: "invalid_value",
    429: "rate_limited",
    500: "internal_error",
    502: "upstream_unavailable",
    503: "unavailable",
}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """The body of every error answer; for OpenAPI's `responses=`."""

    error: ErrorDetail


class APIError(Exception):
    """An error a route answers with: the status, a message a person can act on, and the rest
    of the shape (`type` and `code` default from the status)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str | None = None,
        code: str | None = None,
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param
        self.headers = dict(headers) if headers else None


def error_body(
    status: int, message: str, *, type: str | None = None, code: str | None = None, param: str | None = None
) -> dict[str, Any]:
    """The error JSON for `status`; `type` and `code` default from the status."""
    default_type = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    detail = ErrorDetail(
        message=message[:MAX_MESSAGE], type=type or default_type, param=param, code=code or _CODES.get(status)
    )
    return ErrorResponse(error=detail).model_dump()


def error_response(
    status: int,
    message: str,
    *,
    type: str | None = None,
    code: str | None = None,
    param: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(
        error_body(status, message, type=type, code=code, param=param),
        status_code=status,
        headers=dict(headers) if headers else None,
    )


def field_path(loc: Sequence[Any]) -> str:
    """`("body", "options", "depth")` -> `options.depth`: the field as the client wrote it."""
    parts = list(loc[1:] if loc and loc[0] in _LOCATIONS else loc)
    return ".".join(str(p) for p in parts)


def validation_response(errors: Sequence[Mapping[str, Any]], status: int) -> JSONResponse:
    """Every problem in the message (`path: what is wrong`), the first one's field as `param`."""
    if errors and errors[0].get("type") == "json_invalid":
        return error_response(status, "the request body is not valid JSON", code="invalid_json")
    parts, param = [], None
    for err in errors:
        where = field_path(err.get("loc", ()))
        parts.append(f"{where}: {err.get('msg', 'invalid value')}" if where else err.get("msg", "invalid request"))
        param = param or where or None
    return error_response(status, "; ".join(parts) or "invalid request", code="invalid_value", param=param)


def install(app: FastAPI, validation_status: int = 422) -> None:
    """Answer APIError, HTTP errors (unknown route, wrong method, ...) and validation in the shape."""

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> JSONResponse:
        return error_response(e.status, e.message, type=e.type, code=e.code, param=e.param, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        return error_response(e.status_code, str(e.detail), headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        return validation_response(e.errors(), validation_status)
