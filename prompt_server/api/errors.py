"""The one error shape of the API, {"error": str, "error_type": str}, and the handlers that produce it."""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from prompt_server.adapters.errors import AdapterError, AdapterTooLarge
from prompt_server.api.schemas.text import utf8_safe
from prompt_server.engine.types import (
    AdapterNotFound,
    EngineError,
    EngineStopped,
    InvalidRequest,
    NotServed,
    QueueFull,
)

log = logging.getLogger(__name__)

# error_type values follow TGI's where one exists, so its clients raise the matching exception
VALIDATION = "validation"
BAD_REQUEST = "bad_request"
UNAUTHORIZED = "unauthorized"
NOT_FOUND = "not_found"
TOO_LARGE = "too_large"
OVERLOADED = "overloaded"
UNAVAILABLE = "unavailable"
TIMEOUT = "timeout"
CANCELLED = "cancelled"  # the client closed the request (499)
INTERNAL = "internal"


class ApiError(Exception):
    """An error answered with `status` and {"error": message, "error_type": error_type}."""

    def __init__(self, status: int, message: str, error_type: str, headers: dict[str, str] | None = None):
        # a message may quote a client's value holding a lone surrogate, which no UTF-8 response can carry
        message = utf8_safe(message)
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type
        self.headers = headers

    def body(self) -> dict[str, str]:
        return {"error": self.message, "error_type": self.error_type}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def validation_error(message: str) -> ApiError:
    return ApiError(422, message, VALIDATION)


def from_exception(exc: Exception) -> ApiError:
    """Map an engine or registry error to its HTTP form; anything else is a 500 that hides the detail."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, NotServed):
        return ApiError(400, str(exc), BAD_REQUEST)
    if isinstance(exc, InvalidRequest):
        return ApiError(422, str(exc), VALIDATION)
    if isinstance(exc, AdapterNotFound):
        return ApiError(404, str(exc), NOT_FOUND)
    if isinstance(exc, QueueFull):
        retry = max(1, round(exc.retry_after))
        return ApiError(429, str(exc), OVERLOADED, headers={"Retry-After": str(retry)})
    if isinstance(exc, EngineStopped):
        return ApiError(503, str(exc) or "the engine is not running", UNAVAILABLE)
    if isinstance(exc, AdapterTooLarge):
        return ApiError(413, str(exc), TOO_LARGE)
    if isinstance(exc, AdapterError):
        return ApiError(400, str(exc), BAD_REQUEST)
    if isinstance(exc, EngineError):  # a failure inside the engine (e.g. GenerationFailed); the engine logged it
        return ApiError(500, str(exc) or f"internal error: {type(exc).__name__}", INTERNAL)
    log.exception("unexpected error", exc_info=exc)
    return ApiError(500, f"internal error: {type(exc).__name__}", INTERNAL)


def _loc(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or "body"


_MSG_CHARS = 300  # one validation message is cut to this many characters (a validator may quote a long value)


def _given(value: Any) -> str:
    try:
        text = json.dumps(value, default=str)
    except (ValueError, TypeError, RecursionError):  # e.g. an integer too long to print, or nesting too deep
        return f"a {type(value).__name__}"
    return text if len(text) <= 80 else text[:77] + "..."


def format_validation(errors: list[Any]) -> str:
    """One line per problem: `parameters.top_p: Input should be less than or equal to 1 (given 1.5)`."""
    lines = []
    for err in errors:
        if err.get("type") == "json_invalid":
            lines.append(f"the body is not valid JSON: {err.get('ctx', {}).get('error', err.get('msg'))}")
            continue
        msg = str(err.get("msg", "invalid"))
        msg = msg.removeprefix("Value error, ")
        if len(msg) > _MSG_CHARS:
            msg = msg[: _MSG_CHARS - 3] + "..."
        where = _loc(tuple(err.get("loc", ())))
        if err.get("type") == "missing":
            lines.append(f"{where}: field required")
        else:
            lines.append(f"{where}: {msg} (given {_given(err.get('input'))})")
    return "; ".join(lines)


async def _api_error(_: Request, exc: Exception) -> JSONResponse:
    return from_exception(exc).response()


def _key_refusal(request: Request) -> ApiError | None:
    """The 401 the request would get from the API-key check, if any. FastAPI parses a JSON body before it runs the
    route's dependencies, so a body that is not JSON reaches this handler before the key is checked."""
    from prompt_server.api.deps import require_api_key  # deps imports this module

    service = getattr(request.app.state, "service", None)
    if service is None:
        return None
    try:
        require_api_key(request, service)
    except ApiError as refused:
        return refused
    return None


async def _request_validation(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    refused = _key_refusal(request)  # a client without the key learns nothing of how its body reads
    if refused is not None:
        return refused.response()
    errors = list(exc.errors())
    status = 400 if any(e.get("type") == "json_invalid" for e in errors) else 422
    error_type = BAD_REQUEST if status == 400 else VALIDATION
    return ApiError(status, format_validation(errors), error_type).response()


async def _http_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    kinds = {401: UNAUTHORIZED, 404: NOT_FOUND, 405: BAD_REQUEST, 413: TOO_LARGE, 503: UNAVAILABLE}
    headers = dict(exc.headers) if exc.headers else None
    return ApiError(exc.status_code, str(exc.detail), kinds.get(exc.status_code, BAD_REQUEST), headers).response()


def install(app: FastAPI) -> None:
    """Route every error through the one shape."""
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _request_validation)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    # EngineError and AdapterError are answered here; Exception goes to Starlette's last-resort handler
    for exc_type in (EngineError, AdapterError, Exception):
        app.add_exception_handler(exc_type, _api_error)
