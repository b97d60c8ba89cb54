"""POST /classify bodies."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from prompt_server.api.schemas.text import ValidText


class ClassifyRequest(ValidText):
    model_config = ConfigDict(extra="forbid")

    inputs: str | list[str]
    adapter_id: str | None = None
    labels: list[str] | None = Field(None, min_length=1)


class PredictionPublic(BaseModel):
    label: str
    score: float
    scores: dict[str, float]


class ClassifyResponse(BaseModel):
    predictions: list[PredictionPublic]
