"""Service routes: GET /health, GET /info, GET /metrics, and GET /openapi.json when an API key guards it."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from prompt_server.api.deps import ServiceDep, require_api_key

open_router = APIRouter(tags=["service"])
router = APIRouter(tags=["service"], dependencies=[Depends(require_api_key)])
schema_router = APIRouter(dependencies=[Depends(require_api_key)])


@open_router.get("/health")
async def health(service: ServiceDep) -> JSONResponse:
    """Liveness: 200 while the engine runs, 503 otherwise. Needs no key."""
    if not service.ready:
        return JSONResponse({"status": "unavailable", "error": "the engine is not running",
                             "error_type": "unavailable"}, status_code=503)
    return JSONResponse({"status": "ok"})


@router.get("/info")
async def info(service: ServiceDep) -> dict[str, Any]:
    """Model, dtype, device, limits and version."""
    return await service.info_dict()


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(service: ServiceDep) -> PlainTextResponse:
    """Prometheus text exposition."""
    return PlainTextResponse(await service.metrics_text(), media_type=service.metrics.content_type)


@schema_router.get("/openapi.json", include_in_schema=False)
async def openapi(request: Request) -> JSONResponse:
    """The OpenAPI schema, behind the API key."""
    return JSONResponse(request.app.openapi())
