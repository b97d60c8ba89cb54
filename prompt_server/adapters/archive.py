"""Unpack an uploaded .zip / .tar / .tar.gz holding an adapter's files, at top level or in one folder.

Sizes written in archive headers are never trusted: what is actually unpacked is counted while reading and stops at
max_bytes, so an archive whose headers understate its contents is cut off by the cap, not read to the end.
"""

from __future__ import annotations

import bz2
import copy
import gzip
import io
import lzma
import posixpath
import tarfile
import zipfile
import zlib
from collections.abc import Callable
from typing import IO, Any

from prompt_server.adapters.errors import AdapterError, AdapterTooLarge

_CHUNK = 1 << 16
_TAR_OVERHEAD = 1 << 20  # tar headers, padding and end blocks allowed on top of max_bytes of member contents
_ZIP_ENCRYPTED = 0x1  # general purpose flag bit 0


def _junk(name: str) -> bool:
    return name.startswith("__MACOSX/") or posixpath.basename(name) == ".DS_Store"


def _check_name(name: str) -> str:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise AdapterError(f"archive member name {name!r} is not valid UTF-8") from None
    if any(ord(c) < 32 for c in name):
        raise AdapterError(f"archive member name {name!r} contains control characters")
    clean = posixpath.normpath(name.replace("\\", "/"))
    if name.startswith(("/", "\\")) or clean.startswith("..") or ":" in name or clean in (".", ""):
        raise AdapterError(f"archive member {name!r} has an unsafe path")
    return clean


class _Budget:
    """Counts unpacked bytes across all members and raises AdapterTooLarge past the limit."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.left = max_bytes

    def want(self) -> int:
        """How much to ask a reader or decompressor for next: one chunk, or one byte past the limit at most."""
        return min(_CHUNK, self.left + 1)

    def count(self, chunk: bytes) -> bytes:
        self.left -= len(chunk)
        if self.left < 0:
            raise AdapterTooLarge(f"archive unpacks to more than max_upload_bytes {self.max_bytes}")
        return chunk

    def read(self, fh: IO[bytes]) -> bytes:
        parts: list[bytes] = []
        while True:
            chunk = fh.read(self.want())
            if not chunk:
                return b"".join(parts)
            parts.append(self.count(chunk))

    def decompress(self, decompressor: Any, data: bytes) -> bytes:
        """All that `decompressor` (a bz2 / lzma decompressor object) makes of `data`, asked for one chunk at a time
        (max_length), so a bomb is stopped at the limit instead of inflated in one call."""
        parts = [self.count(decompressor.decompress(data, max_length=self.want()))]
        # needs_input without eof: the stream ended early (or, for LZMA without an end marker, just ended); the
        # size and CRC checks judge what came out
        while not decompressor.eof and not decompressor.needs_input:
            parts.append(self.count(decompressor.decompress(b"", max_length=self.want())))
        return b"".join(parts)


def _zip_raw(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytes:
    """A member's compressed bytes as stored (at most what the upload holds)."""
    raw = copy.copy(info)
    raw.compress_type = zipfile.ZIP_STORED
    raw.file_size = info.compress_size
    del raw.CRC  # the CRC is of the uncompressed content: checked after decompressing
    with zf.open(raw) as fh:
        return fh.read()


def _zip_decompressor(info: zipfile.ZipInfo, raw: bytes) -> tuple[Any, bytes]:
    """(decompressor, its input) for a bzip2 or LZMA member."""
    if info.compress_type == zipfile.ZIP_BZIP2:
        return bz2.BZ2Decompressor(), raw
    # zip's LZMA: 2 bytes of version, the properties' size (2 bytes, little-endian), the properties, a raw LZMA1 stream
    if len(raw) < 4:
        raise AdapterError(f"archive member {info.filename!r} has a truncated LZMA header")
    size = int.from_bytes(raw[2:4], "little")
    # as zipfile reads it (the same private helper)
    filters = [lzma._decode_filter_properties(lzma.FILTER_LZMA1, raw[4: 4 + size])]  # type: ignore[attr-defined]
    return lzma.LZMADecompressor(lzma.FORMAT_RAW, filters=filters), raw[4 + size:]


def _zip_members(data: bytes, add: Callable[[str, int, Callable[[], bytes]], None], budget: _Budget) -> None:
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        for info in zf.infolist():
            if info.is_dir():
                _check_name(info.filename)
                continue
            if info.flag_bits & _ZIP_ENCRYPTED:
                raise AdapterError(f"archive member {info.filename!r} is encrypted: upload it without a password")
            if info.compress_type in (zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA):
                # zipfile inflates each bzip2 / LZMA block it reads whole, however far past what was asked for (a
                # 1 KB member can make gigabytes): these are decompressed here, a chunk at a time

                def decompress(info: zipfile.ZipInfo = info) -> bytes:
                    content = budget.decompress(*_zip_decompressor(info, _zip_raw(zf, info)))
                    if len(content) == info.file_size and zlib.crc32(content) != info.CRC:
                        raise AdapterError(f"archive member {info.filename!r} is corrupt: bad CRC-32")
                    return content

                add(info.filename, info.file_size, decompress)
                continue
            # zipfile stops at the header's file_size; let it read up to what is left of the budget instead, so
            # the cap bounds the unpacking and a header that understates the size is caught below. Stored and
            # deflated members are read at most a chunk ahead of what is asked for.
            unbounded = copy.copy(info)
            unbounded.file_size = budget.left + 2 * _CHUNK  # zipfile inflates ahead of what it returns

            def read(unbounded: zipfile.ZipInfo = unbounded) -> bytes:
                with zf.open(unbounded) as fh:
                    return budget.read(fh)

            add(info.filename, info.file_size, read)


def _decompressed(data: bytes, limit: int) -> bytes:
    """The tar stream inside a gzip / bzip2 / xz file (or data itself), at most limit bytes of it."""
    opener: Callable[[IO[bytes]], Any] | None = None
    if data[:2] == b"\x1f\x8b":
        opener = lambda fh: gzip.GzipFile(fileobj=fh)
    elif data[:3] == b"BZh":
        opener = bz2.BZ2File
    elif data[:6] == b"\xfd7zXZ\x00":
        opener = lzma.LZMAFile
    if opener is None:
        return data
    with opener(io.BytesIO(data)) as fh:
        out = fh.read(limit + 1)
    if len(out) > limit:
        raise AdapterTooLarge(f"archive unpacks to more than max_upload_bytes {limit - _TAR_OVERHEAD}")
    return out


def _tar_members(data: bytes, add: Callable[[str, int, Callable[[], bytes]], None], budget: _Budget) -> None:
    raw = _decompressed(data, budget.max_bytes + _TAR_OVERHEAD)
    with tarfile.open(fileobj=io.BytesIO(raw), mode="r:", encoding="utf-8", errors="surrogateescape") as tf:
        for member in tf:
            if member.isdir():
                _check_name(member.name)
                continue
            if not member.isfile():
                raise AdapterError(f"archive member {member.name!r} is a link or device, expected a regular file")

            def read(member: tarfile.TarInfo = member) -> bytes:
                fh = tf.extractfile(member)
                assert fh is not None  # a regular file always has a reader
                return budget.read(fh)

            add(member.name, member.size, read)


def _members(data: bytes, max_bytes: int) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    budget = _Budget(max_bytes)

    def add(name: str, size: int, read: Callable[[], bytes]) -> None:
        name = _check_name(name)
        if _junk(name):
            return
        if name in out:
            raise AdapterError(f"archive holds {name!r} twice")
        content = read()
        if len(content) != size:
            raise AdapterError(f"archive member {name!r} holds {len(content)} bytes, its header says {size}")
        out[name] = content

    is_zip = zipfile.is_zipfile(io.BytesIO(data))
    try:
        (_zip_members if is_zip else _tar_members)(data, add, budget)
    except AdapterError:
        raise
    except UnicodeDecodeError as e:
        raise AdapterError(f"archive member name is marked UTF-8 but is not valid UTF-8: {e}") from None
    except Exception as e:  # noqa: BLE001 -- crafted archives make zipfile/tarfile/zlib raise many types
        if is_zip:
            raise AdapterError(f"archive is corrupt or uses an unsupported zip feature: {e}") from None
        raise AdapterError(f"archive is not a readable .zip, .tar or .tar.gz file: {e}") from None
    return out


def unpack_archive(data: bytes, max_bytes: int) -> dict[str, bytes]:
    """Return {file name: content} of the adapter files inside the archive."""
    members = _members(data, max_bytes)
    if not members:
        raise AdapterError("archive is empty: expected adapter_config.json and a weights file")
    folders = {posixpath.dirname(n) for n in members}
    if len(folders) != 1 or posixpath.dirname(next(iter(folders))):
        raise AdapterError(
            f"archive must hold the adapter files at top level or in one folder, got {sorted(members)}"
        )
    return {posixpath.basename(n): c for n, c in members.items()}
