"""Service routes: GET /health, GET /info, GET /metrics, and GET /openapi.json when an API key guards it."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from prompt_server.api.deps import ServiceDep, require_api_key
from prompt_server.api.schemas.service import Health, Info

open_router = APIRouter(tags=["service"])
router = APIRouter(tags=["service"], dependencies=[Depends(require_api_key)])
schema_router = APIRouter(dependencies=[Depends(require_api_key)])


@open_router.get("/health", response_model=Health,
                 responses={503: {"description": "the engine is not running (status unavailable, with the error)"}})
async def health(service: ServiceDep) -> Health | JSONResponse:
    """Liveness: 200 while the engine runs, 503 otherwise. Needs no key."""
    if not service.ready:
        return JSONResponse({"status": "unavailable", "error": "the engine is not running",
                             "error_type": "unavailable"}, status_code=503)
    return Health()


@router.get("/info", response_model=Info)
async def info(service: ServiceDep) -> Info:
    """Model, dtype, device, limits and version."""
    return await service.info_body()


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(service: ServiceDep) -> PlainTextResponse:
    """Prometheus text exposition."""
    return PlainTextResponse(await service.metrics_text(), media_type=service.metrics_content_type)


@schema_router.get("/openapi.json", include_in_schema=False)
async def openapi(request: Request) -> JSONResponse:
    """The OpenAPI schema, behind the API key."""
    return JSONResponse(request.app.openapi())
