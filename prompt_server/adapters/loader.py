"""Load one adapter directory (as PEFT's save_pretrained writes it, or as the store keeps it)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from prompt_server.adapters.convert import build_soft_prompt
from prompt_server.adapters.errors import AdapterError
from prompt_server.adapters.peft_format import check_adapter_id
from prompt_server.adapters.types import ModelSpec, SoftPrompt

META_FILE = "meta.json"


def read_meta(path: Path) -> dict[str, Any] | None:
    """The store's meta.json of an adapter directory, or None if it has none."""
    try:
        meta = json.loads((path / META_FILE).read_text("utf-8"))
    except FileNotFoundError:
        return None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterError(f"{META_FILE} is not valid JSON: {e}") from None
    if not isinstance(meta, dict):
        raise AdapterError(f"{META_FILE} must hold a JSON object")
    version = meta.get("version", 1)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise AdapterError(f"{META_FILE}: version must be a positive integer, got {version!r}")
    created_at = meta.get("created_at")
    if created_at is not None and (isinstance(created_at, bool) or not isinstance(created_at, (int, float))):
        raise AdapterError(f"{META_FILE}: created_at must be a unix time, got {created_at!r}")
    return meta


def read_dir_files(path: Path) -> dict[str, bytes]:
    """Every file of an adapter directory except meta.json, by name."""
    if not path.is_dir():
        raise AdapterError(f"adapter directory {str(path)!r} does not exist")
    files: dict[str, bytes] = {}
    for entry in path.iterdir():
        if entry.name == META_FILE:
            continue
        if not entry.is_file():
            raise AdapterError(f"unknown entry {entry.name!r} in {path}: expected only adapter files")
        files[entry.name] = entry.read_bytes()
    return files


def load_adapter_dir(
    path: str | Path,
    spec: ModelSpec,
    *,
    device: Any,
    dtype: torch.dtype,
    max_virtual_tokens: int = 128,
    adapter_id: str | None = None,
) -> SoftPrompt:
    """Load and validate an adapter directory (id: the directory name; version and labels: meta.json, else 1)."""
    path = Path(path)
    adapter_id = check_adapter_id(path.name if adapter_id is None else adapter_id)
    meta = read_meta(path) or {}
    files = read_dir_files(path)
    record = build_soft_prompt(
        adapter_id,
        files,
        spec,
        device=device,
        dtype=dtype,
        max_virtual_tokens=max_virtual_tokens,
        version=meta.get("version", 1),
        created_at=meta.get("created_at"),
        labels=meta.get("labels"),
    )
    if meta.get("sha256") not in (None, record.sha256):
        raise AdapterError(f"weights sha256 {record.sha256} does not match {META_FILE}'s {meta['sha256']}")
    return record
