"""Counts every request by route template, adapter and status code (pure ASGI, so streams pass untouched)."""

from __future__ import annotations

from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send


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
