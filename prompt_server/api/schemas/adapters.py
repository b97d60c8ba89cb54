"""Adapter records as the API shows them."""

from __future__ import annotations

from pydantic import BaseModel, field_validator

from prompt_server.api.schemas.text import utf8_safe


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

    @field_validator("labels", "base_model")
    @classmethod
    def _encodable(cls, v: list[str] | str | None) -> list[str] | str | None:
        """A stored record's free text is answered as UTF-8 can carry it, so one bad record cannot make the adapter
        routes fail (a lone surrogate is shown as its escape)."""
        if isinstance(v, str):
            return utf8_safe(v)
        return None if v is None else [utf8_safe(x) for x in v]


class AdaptersPublic(BaseModel):
    adapters: list[AdapterPublic]
