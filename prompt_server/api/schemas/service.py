"""GET /health and GET /info bodies."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Limits(BaseModel):
    max_input_tokens: int
    max_new_tokens: int
    default_max_new_tokens: int
    max_batch_size: int
    max_batch_tokens: int
    max_queue: int
    max_stop_sequences: int
    max_labels: int
    max_virtual_tokens: int
    max_upload_bytes: int
    request_timeout: float


class Auth(BaseModel):
    api_key: bool  # whether a key guards the routes (never the key itself)
    admin_key: bool


class SkippedAdapter(BaseModel):
    id: str
    error: str


class Info(BaseModel):
    model_id: str
    model_path: str
    model_dtype: str
    model_device: str
    architecture: str
    model_type: str
    transformers_version: str
    family: Literal["causal", "encoder", "seq2seq"]
    tasks: list[str]
    forward_path: Literal["lean", "generic", "encoder", "seq2seq"]
    forward_path_reason: str
    forward_compiled: bool
    forward_native_kernels: bool
    forward_cuda_graphs: bool
    max_position: int
    serving_notes: list[str]
    version: str
    adapters_loaded: int
    adapters_skipped: list[SkippedAdapter]
    limits: Limits
    auth: Auth
