"""The edge of an adapter upload: the multipart body is parsed as it streams in, an `archive` part is unpacked here,
and this is the one place the server holds an upload to max_upload_bytes (the body while it arrives, an archive's
contents while they unpack). What leaves is the adapter's files by name, for the registry to validate in memory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from prompt_server.adapters.archive import unpack_archive
from prompt_server.adapters.errors import AdapterError
from prompt_server.api.errors import BAD_REQUEST, TOO_LARGE, ApiError, from_exception

FILE_PARTS = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "archive")
TEXT_PARTS = ("labels",)
TEXT_PART_LIMIT = 64 * 1024  # bytes of a text field such as labels
OVERHEAD = 64 * 1024  # multipart boundaries and part headers on top of the file bytes


@dataclass
class Upload:
    files: dict[str, bytes] = field(default_factory=dict)  # the adapter's files, an archive already unpacked
    labels: list[str] | None = None


def _too_large(limit: int, what: str) -> ApiError:
    return ApiError(413, f"upload too large: {what} is over max_upload_bytes={limit}", TOO_LARGE)


class _Collector:
    """Callbacks for MultipartParser that keep each part's bytes under its limit."""

    def __init__(self, limit: int):
        self.limit = limit
        self.parts: dict[str, bytearray] = {}
        self.file_bytes = 0
        self._header_field = b""
        self._header_value = b""
        self._headers: dict[bytes, bytes] = {}
        self._current: str | None = None

    def callbacks(self) -> dict:
        return {
            "on_part_begin": self.part_begin,
            "on_header_field": self.header_field,
            "on_header_value": self.header_value,
            "on_header_end": self.header_end,
            "on_headers_finished": self.headers_finished,
            "on_part_data": self.part_data,
        }

    def part_begin(self) -> None:
        self._headers = {}
        self._current = None

    def header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_field += data[start:end]

    def header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def header_end(self) -> None:
        self._headers[self._header_field.lower()] = self._header_value
        self._header_field = b""
        self._header_value = b""

    def headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        name = options.get(b"name", b"").decode("utf-8", "replace")
        if name not in FILE_PARTS + TEXT_PARTS:
            expected = ", ".join(FILE_PARTS + TEXT_PARTS)
            raise ApiError(400, f"unexpected multipart field {name!r} (expected one of: {expected})", BAD_REQUEST)
        if name in self.parts:
            raise ApiError(400, f"multipart field {name!r} was sent twice", BAD_REQUEST)
        self.parts[name] = bytearray()
        self._current = name

    def part_data(self, data: bytes, start: int, end: int) -> None:
        assert self._current is not None
        size = end - start
        if self._current in TEXT_PARTS:
            if len(self.parts[self._current]) + size > TEXT_PART_LIMIT:
                raise ApiError(413, f"field {self._current!r} exceeds {TEXT_PART_LIMIT} bytes", TOO_LARGE)
        else:
            self.file_bytes += size
            if self.file_bytes > self.limit:
                raise _too_large(self.limit, f"the files' size ({self.file_bytes}+ bytes)")
        self.parts[self._current] += data[start:end]


def _labels(raw: bytes) -> list[str]:
    try:
        value = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # not UTF-8 or not JSON, an integer too long, nesting too deep
        reason = str(exc)[:120] if not isinstance(exc, RecursionError) else "nested too deep"
        raise ApiError(400, f"labels must be a JSON list of strings, got invalid JSON ({reason})", BAD_REQUEST) from None
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        shown = repr(value)
        shown = shown if len(shown) <= 120 else shown[:117] + "..."
        raise ApiError(400, f"labels must be a non-empty JSON list of non-empty strings, got {shown}", BAD_REQUEST)
    for v in value:
        try:
            v.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate (JSON "\ud800"): no response could carry it back
            raise ApiError(400, "labels must be valid Unicode text: a label holds a lone surrogate",
                           BAD_REQUEST) from None
    return value


def adapter_files(parts: dict[str, bytes], limit: int) -> dict[str, bytes]:
    """The adapter's files from an upload's file parts: one `archive` part unpacked (zip-slip, links, bombs and
    encrypted members refused; at most `limit` bytes unpacked, counted while unpacking), else the parts themselves.

    Raises AdapterError (400) or AdapterTooLarge (413). CPU-bound for an archive: call it off the event loop."""
    if "archive" not in parts:
        return parts
    if len(parts) != 1:
        raise AdapterError(f"an archive upload takes no other files, got {sorted(set(parts) - {'archive'})}")
    return unpack_archive(parts["archive"], limit)


async def read_upload(request: Request, limit: int) -> Upload:
    """Parse a multipart adapter upload, refusing with 413 as soon as the body outgrows `limit`, and unpack an
    archive part (in a worker thread) into the adapter's files."""
    content_type, options = parse_options_header(request.headers.get("content-type", ""))
    if content_type != b"multipart/form-data" or b"boundary" not in options:
        given = request.headers.get("content-type") or "none"
        raise ApiError(400, f"the body must be multipart/form-data (given content-type {given})", BAD_REQUEST)
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit + OVERHEAD:
        raise _too_large(limit, f"the body ({declared} bytes)")
    collector = _Collector(limit)
    parser = MultipartParser(options[b"boundary"], collector.callbacks())  # type: ignore[arg-type]  # a TypedDict
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > limit + OVERHEAD:
                raise _too_large(limit, f"the body ({received}+ bytes)")
            parser.write(chunk)
        parser.finalize()
    except FormParserError as exc:
        raise ApiError(400, f"malformed multipart body: {exc}", BAD_REQUEST) from None
    parts = collector.parts
    files = {k: bytes(v) for k, v in parts.items() if k in FILE_PARTS}
    labels = _labels(bytes(parts["labels"])) if "labels" in parts else None
    if not files:
        raise ApiError(400, "no adapter files: send adapter_config.json and adapter_model.safetensors "
                       "(or adapter_model.bin), or one part named archive", BAD_REQUEST)
    if "archive" in files:
        try:
            files = await run_in_threadpool(adapter_files, files, limit)
        except AdapterError as exc:
            raise from_exception(exc) from None
    return Upload(files=files, labels=labels)
