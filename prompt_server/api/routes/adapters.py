"""Adapter management: list, show, upload (create or replace), delete."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse

from prompt_server.api.deps import ServiceDep, require_admin_key
from prompt_server.api.errors import NOT_FOUND, ApiError
from prompt_server.api.schemas.adapters import AdapterPublic, AdaptersPublic
from prompt_server.api.upload import read_upload

router = APIRouter(prefix="/adapters", tags=["adapters"])


def public(record: Any) -> AdapterPublic:
    return AdapterPublic(
        id=record.id,
        peft_type=record.peft_type,
        task_type=record.task_type,
        num_virtual_tokens=record.num_virtual_tokens,
        version=record.version,
        sha256=record.sha256,
        size_bytes=record.size_bytes,
        created_at=record.created_at,
        labels=list(record.labels) if record.labels is not None else None,
        base_model=record.base_model,
        has_classifier=record.classifier is not None,
    )


def _not_found(adapter_id: str) -> ApiError:
    return ApiError(404, f"adapter '{adapter_id}' not found", NOT_FOUND)


@router.get("", response_model=AdaptersPublic)
async def list_adapters(service: ServiceDep) -> AdaptersPublic:
    """Every adapter in the registry."""
    return AdaptersPublic(adapters=[public(r) for r in sorted(await service.adapters(), key=lambda r: r.id)])


@router.get("/{adapter_id}", response_model=AdapterPublic)
async def get_adapter(adapter_id: str, request: Request, service: ServiceDep) -> AdapterPublic:
    """One adapter's record."""
    await service.label(request, adapter_id)
    record = await service.adapter(adapter_id)
    if record is None:
        raise _not_found(adapter_id)
    return public(record)


@router.put("/{adapter_id}", response_model=AdapterPublic, status_code=201,
            dependencies=[Depends(require_admin_key)],
            responses={200: {"description": "replaced"}, 201: {"description": "created"}})
async def put_adapter(adapter_id: str, request: Request, service: ServiceDep) -> JSONResponse:
    """Upload a PEFT adapter (multipart files or one archive part); 201 when created, 200 when replaced."""
    await service.label(request, adapter_id)
    # the edge: the body held to max_upload_bytes (413) and an archive unpacked, so the registry gets plain files
    upload = await read_upload(request, service.settings.max_upload_bytes)
    # validated in memory, then written once; AdapterError answers 400 through the error handlers
    record, created = await service.put_adapter(adapter_id, upload.files, upload.labels)
    request.state.adapter = record.id
    return JSONResponse(public(record).model_dump(), status_code=201 if created else 200)


@router.delete("/{adapter_id}", status_code=204, dependencies=[Depends(require_admin_key)])
async def delete_adapter(adapter_id: str, request: Request, service: ServiceDep) -> Response:
    """Remove an adapter; requests already running with it finish with the version they started with."""
    await service.label(request, adapter_id)
    deleted = await service.delete_adapter(adapter_id)
    if not deleted:
        raise _not_found(adapter_id)
    return Response(status_code=204)
