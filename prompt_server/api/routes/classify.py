"""POST /classify: label scores from an adapter's classifier head, or from verbalizer likelihoods."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request

from prompt_server.api.deps import ServiceDep
from prompt_server.api.engine_requests import check_input_chars
from prompt_server.api.errors import validation_error
from prompt_server.api.schemas.classify import ClassifyRequest, ClassifyResponse, PredictionPublic
from prompt_server.engine.types import ClassifyRequest as EngineClassifyRequest

router = APIRouter(tags=["classify"])


@router.post("/classify", response_model=ClassifyResponse)
async def classify(body: ClassifyRequest, request: Request, service: ServiceDep) -> ClassifyResponse:
    """Classify one text or a list of texts."""
    await service.label(request, body.adapter_id)
    inputs = [body.inputs] if isinstance(body.inputs, str) else list(body.inputs)
    if not inputs:
        raise validation_error("inputs: must hold at least one text, given an empty list")
    if len(inputs) > service.settings.max_batch_size:
        raise validation_error(
            f"inputs: at most {service.settings.max_batch_size} texts (max_batch_size), given {len(inputs)}"
        )
    for i, text in enumerate(inputs):
        if not text:
            raise validation_error(f"inputs[{i}]: must not be empty")
        check_input_chars(len(text), service.settings, f"inputs[{i}]")
    if body.labels is not None and (len(set(body.labels)) != len(body.labels) or "" in body.labels):
        raise validation_error(f"labels: must be distinct non-empty strings, given {body.labels!r}")
    started = time.monotonic()
    predictions = await service.classify(
        EngineClassifyRequest(inputs=inputs, adapter_id=body.adapter_id or None, labels=body.labels)
    )
    service.metrics.hist["request_duration_seconds"].observe(time.monotonic() - started)
    return ClassifyResponse(
        predictions=[PredictionPublic(label=p.label, score=p.score, scores=p.scores) for p in predictions]
    )
