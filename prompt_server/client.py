"""A small HTTP client for the adapter routes, used by `prompt-server adapters ...`.

An upload is prepared in one place, upload_files(): a PEFT directory's config and weights, or an archive's files
unpacked here with the server's own safe unpacker, all held to the server's max_upload_bytes, so a bad archive or
an oversized upload is refused before anything is sent.
"""

from __future__ import annotations

import builtins
import json
from pathlib import Path
from typing import Any

import httpx
from typing_extensions import Self

from prompt_server.adapters.archive import unpack_archive
from prompt_server.adapters.errors import AdapterError, AdapterTooLarge

CONFIG_FILE = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
SKIPPED_FILES = ("README.md",)  # PEFT's model card: the server ignores it too
DEFAULT_MAX_UPLOAD_BYTES = 64 * 1024 * 1024  # the server's default, for a server whose GET /info does not say
ARCHIVE_SLACK = 1 << 20  # archive headers and padding allowed on top of max_upload_bytes of contents


class ClientError(Exception):
    """The server answered with an error; the message is its own."""

    def __init__(self, status: int, message: str):
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


class UploadRefused(ClientError):
    """An upload refused here, before anything was sent; `status` is what the server would have answered."""

    def __init__(self, status: int, message: str):
        Exception.__init__(self, f"upload not sent: {message}")
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


def check_source(path: Path) -> Path | None:
    """The weights file of a PEFT directory, or None for an archive file; FileNotFoundError for anything else."""
    if path.is_file():
        return None
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is neither a PEFT adapter directory nor an archive file")
    config = path / CONFIG_FILE
    if not config.is_file():
        raise FileNotFoundError(f"{config} not found: not a PEFT adapter directory")
    weights = [path / name for name in WEIGHT_FILES if (path / name).is_file()]
    if not weights:
        raise FileNotFoundError(f"{path} holds neither {' nor '.join(WEIGHT_FILES)}")
    return weights[0]


def _archive_files(path: Path, max_bytes: int) -> dict[str, bytes]:
    size = path.stat().st_size
    if size > max_bytes + ARCHIVE_SLACK:
        raise AdapterTooLarge(f"the archive ({size} bytes) is over max_upload_bytes={max_bytes}")
    files = {n: d for n, d in unpack_archive(path.read_bytes(), max_bytes).items() if n not in SKIPPED_FILES}
    unknown = sorted(set(files) - {CONFIG_FILE, *WEIGHT_FILES})
    if unknown:
        raise AdapterError(f"unknown file(s) {', '.join(unknown)} in {path.name}: expected {CONFIG_FILE} and one "
                           f"of {', '.join(WEIGHT_FILES)}")
    return files


def upload_files(path: Path, max_bytes: int = DEFAULT_MAX_UPLOAD_BYTES) -> dict[str, tuple[str, bytes]]:
    """The multipart file parts for a PEFT directory (config + weights) or an archive file (unpacked here: the
    server gets the files). The one place the client reads an upload and holds it to max_bytes; raises
    FileNotFoundError for a path that is neither, UploadRefused for what the server would refuse."""
    path = Path(path)
    weights = check_source(path)
    try:
        if weights is None:
            files = _archive_files(path, max_bytes)
        else:
            size = (path / CONFIG_FILE).stat().st_size + weights.stat().st_size
            if size > max_bytes:
                raise AdapterTooLarge(f"the files' size ({size} bytes) is over max_upload_bytes={max_bytes}")
            files = {CONFIG_FILE: (path / CONFIG_FILE).read_bytes(), weights.name: weights.read_bytes()}
    except AdapterError as exc:
        raise UploadRefused(413 if isinstance(exc, AdapterTooLarge) else 400, str(exc)) from None
    return {name: (name, data) for name, data in files.items()}


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

    def max_upload_bytes(self) -> int:
        """The server's upload limit, from GET /info (the default when the server does not say)."""
        limits = _check(self.http.get("/info")).json().get("limits") or {}
        limit = limits.get("max_upload_bytes") if isinstance(limits, dict) else None
        if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0:
            return limit
        return DEFAULT_MAX_UPLOAD_BYTES

    def push(
        self, adapter_id: str, path: Path, labels: builtins.list[str] | None = None, max_bytes: int | None = None
    ) -> tuple[dict[str, Any], bool]:
        """Upload a directory or archive (unpacked here), held to max_bytes (default: the server's
        max_upload_bytes); returns (record, created)."""
        path = Path(path)
        check_source(path)  # a wrong path is reported before the server is asked anything
        files = upload_files(path, self.max_upload_bytes() if max_bytes is None else max_bytes)
        data = {"labels": json.dumps(labels)} if labels else None
        resp = _check(self.http.put(f"/adapters/{adapter_id}", files=files, data=data))
        return resp.json(), resp.status_code == 201

    def remove(self, adapter_id: str) -> None:
        _check(self.http.delete(f"/adapters/{adapter_id}"))
