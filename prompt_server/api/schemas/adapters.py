"""Adapter records as the API shows them."""

from __future__ import annotations

from pydantic import BaseModel


class AdapterPublic(BaseModel):
    id: str
    peft_type: str
    task_type: str
    num_virtual_tokens: int
    version: int
    sha256: str
    size_bytes: int
    created_at: float
    labels: list[str] | None
    base_model: str | None = None
    has_classifier: bool = False


class AdaptersPublic(BaseModel):
    adapters: list[AdapterPublic]
