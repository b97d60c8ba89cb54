"""Unpack an uploaded .zip / .tar / .tar.gz holding an adapter's files, at top level or in one folder."""

from __future__ import annotations

import io
import posixpath
import tarfile
import zipfile
import zlib

from prompt_server.adapters.errors import AdapterError, AdapterTooLarge


def _junk(name: str) -> bool:
    return name.startswith("__MACOSX/") or posixpath.basename(name) == ".DS_Store"


def _check_name(name: str) -> str:
    clean = posixpath.normpath(name.replace("\\", "/"))
    if name.startswith(("/", "\\")) or clean.startswith("..") or ":" in name or clean in (".", ""):
        raise AdapterError(f"archive member {name!r} has an unsafe path")
    return clean


def _members(data: bytes, max_bytes: int) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    total = 0

    def add(name: str, size: int, read) -> None:
        nonlocal total
        name = _check_name(name)
        if _junk(name):
            return
        total += size
        if total > max_bytes:
            raise AdapterTooLarge(f"archive unpacks to more than max_upload_bytes {max_bytes}")
        content = read()
        if len(content) != size:
            raise AdapterError(f"archive member {name!r} is truncated")
        if name in out:
            raise AdapterError(f"archive holds {name!r} twice")
        out[name] = content

    if zipfile.is_zipfile(io.BytesIO(data)):
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as zf:
                for info in zf.infolist():
                    if info.is_dir():
                        _check_name(info.filename)
                        continue
                    add(info.filename, info.file_size, lambda info=info: zf.read(info))
        except (zipfile.BadZipFile, zlib.error, NotImplementedError, OSError) as e:
            raise AdapterError(f"archive is corrupt or uses an unsupported compression: {e}") from None
        return out
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tf:
            for member in tf:
                if member.isdir():
                    _check_name(member.name)
                    continue
                if not member.isfile():
                    raise AdapterError(f"archive member {member.name!r} is a link or device, expected a regular file")
                add(member.name, member.size, lambda m=member: tf.extractfile(m).read())  # type: ignore[union-attr]
    except (tarfile.TarError, EOFError, OSError) as e:
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
