"""POST /classify: label scores from an adapter's classifier head, or from verbalizer likelihoods."""

from __future__ import annotations

from fastapi import APIRouter, Request

from prompt_server.api.deps import ServiceDep
from prompt_server.api.schemas.classify import ClassifyRequest, ClassifyResponse, PredictionPublic
from prompt_server.engine.types import ClassifyRequest as EngineClassifyRequest

router = APIRouter(tags=["classify"])


@router.post("/classify", response_model=ClassifyResponse)
async def classify(body: ClassifyRequest, request: Request, service: ServiceDep) -> ClassifyResponse:
    """Classify one text or a list of texts."""
    await service.label(request, body.adapter_id)
    inputs = [body.inputs] if isinstance(body.inputs, str) else list(body.inputs)
    predictions = await service.classify(
        EngineClassifyRequest(inputs=inputs, adapter_id=body.adapter_id or None, labels=body.labels)
    )
    return ClassifyResponse(
        predictions=[PredictionPublic(label=p.label, score=p.score, scores=p.scores) for p in predictions]
    )
