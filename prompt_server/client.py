"""A small HTTP client for the adapter routes, used by `prompt-server adapters ...`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
from typing_extensions import Self

WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")


class ClientError(Exception):
    """The server answered with an error; the message is its own."""

    def __init__(self, status: int, message: str):
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


def _headers(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


def _check(resp: httpx.Response) -> httpx.Response:
    if resp.status_code >= 400:
        try:
            message = resp.json().get("error", resp.text)
        except (ValueError, AttributeError):
            message = resp.text
        raise ClientError(resp.status_code, message)
    return resp


def upload_files(path: Path) -> dict[str, tuple[str, bytes]]:
    """The multipart parts for a PEFT directory (config + weights) or an archive file."""
    if path.is_file():
        return {"archive": (path.name, path.read_bytes())}
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is neither a PEFT adapter directory nor an archive file")
    config = path / "adapter_config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{config} not found: not a PEFT adapter directory")
    weights = [path / name for name in WEIGHT_FILES if (path / name).is_file()]
    if not weights:
        raise FileNotFoundError(f"{path} holds neither {' nor '.join(WEIGHT_FILES)}")
    return {
        "adapter_config.json": ("adapter_config.json", config.read_bytes()),
        weights[0].name: (weights[0].name, weights[0].read_bytes()),
    }


class AdminClient:
    """List, push and remove adapters on a running server."""

    def __init__(self, url: str, key: str | None = None, timeout: float = 60.0):
        self.http = httpx.Client(base_url=url.rstrip("/"), headers=_headers(key), timeout=timeout)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.http.close()

    def list(self) -> list[dict[str, Any]]:
        return _check(self.http.get("/adapters")).json()["adapters"]

    def get(self, adapter_id: str) -> dict[str, Any]:
        return _check(self.http.get(f"/adapters/{adapter_id}")).json()

    def push(self, adapter_id: str, path: Path, labels: list[str] | None = None) -> tuple[dict[str, Any], bool]:
        """Upload a directory or archive; returns (record, created)."""
        data = {"labels": json.dumps(labels)} if labels else None
        resp = _check(self.http.put(f"/adapters/{adapter_id}", files=upload_files(Path(path)), data=data))
        return resp.json(), resp.status_code == 201

    def remove(self, adapter_id: str) -> None:
        _check(self.http.delete(f"/adapters/{adapter_id}"))
