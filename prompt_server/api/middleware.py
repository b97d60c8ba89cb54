"""Pure ASGI middleware (streams pass untouched): the request counter, by route template, adapter and status code;
the body limit for JSON requests."""

from __future__ import annotations

from typing import Any

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from prompt_server.api.errors import TOO_LARGE, ApiError


class RequestCounter:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = [500]

        async def send_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self._count(scope, status[0])

    @staticmethod
    def _count(scope: Scope, status: int) -> None:
        app: Any = scope.get("app")
        service = getattr(getattr(app, "state", None), "service", None)
        if service is None:
            return
        route = getattr(scope.get("route"), "path", None) or "unmatched"
        # routes set the label through Service.adapter_label: an id the registry holds, "unknown" or "none"
        adapter = scope.get("state", {}).get("adapter") or "none"
        service.metrics.count_request(route, adapter, status)


class BodyLimit:
    """Hold every request body but an adapter upload (PUT /adapters/{id}, held to max_upload_bytes as it streams)
    to the max_request_bytes setting: a declared Content-Length over it is refused before a byte is read, a
    chunked body as soon as it outgrows it, both with the API's 413 error. Without it a client, with or without
    a key, could make the server hold any amount of JSON (FastAPI reads the body before it checks the key).

    FastAPI's own max_body_size answers a declared Content-Length with a plain-text 413, outside the error
    contract; this answers both cases in it."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        service = getattr(getattr(scope.get("app"), "state", None), "service", None)
        if scope["type"] != "http" or service is None or _is_upload(scope):
            await self.app(scope, receive, send)
            return
        limit: int = service.settings.max_request_bytes
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            await _too_large(limit, f"{declared} bytes").response()(scope, receive, send)
            return
        received = 0

        async def receive_limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    # an HTTPException passes FastAPI's body parsing unchanged, to the API's 413 handler
                    raise HTTPException(413, _too_large(limit, f"{received}+ bytes").message)
            return message

        await self.app(scope, receive_limited, send)


def _is_upload(scope: Scope) -> bool:
    return scope.get("method") == "PUT" and str(scope.get("path", "")).startswith("/adapters/")


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            return int(value) if value.isdigit() else None
    return None


def _too_large(limit: int, given: str) -> ApiError:
    return ApiError(413, f"request body too large: {given}, over max_request_bytes={limit}", TOO_LARGE)
