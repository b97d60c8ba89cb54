"""Hostile archives: every one is rejected with an AdapterError, and unpacking is bounded by the size cap."""

from __future__ import annotations

import io
import struct
import tarfile
import time
import tracemalloc
import zipfile
import zlib

import pytest

from prompt_server.adapters.archive import unpack_archive
from prompt_server.adapters.errors import AdapterError, AdapterTooLarge
from prompt_server.adapters.registry import AdapterRegistry
from prompt_server.api.upload import adapter_files

LOCAL, CENTRAL = b"PK\x03\x04", b"PK\x01\x02"
# offsets inside each header of: general purpose flags, uncompressed size
FLAGS = {LOCAL: 6, CENTRAL: 8}
SIZE = {LOCAL: 22, CENTRAL: 24}


def peak_bytes(fn) -> int:
    """Peak Python memory allocated while fn runs."""
    tracemalloc.start()
    try:
        fn()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


def zip_bytes(files: dict[str, bytes], compression: int = zipfile.ZIP_STORED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


def patch_headers(data: bytes, *, flags: int = 0, size: int | None = None) -> bytes:
    """Set flag bits and/or overwrite the uncompressed size in every local and central header (one-member zips)."""
    out = bytearray(data)
    for sig in (LOCAL, CENTRAL):
        at = out.index(sig)
        (old,) = struct.unpack_from("<H", out, at + FLAGS[sig])
        struct.pack_into("<H", out, at + FLAGS[sig], old | flags)
        if size is not None:
            struct.pack_into("<I", out, at + SIZE[sig], size)
    return bytes(out)


def test_encrypted_zip_rejected(llama_spec):
    data = patch_headers(zip_bytes({"adapter_config.json": b"{}"}), flags=0x1)
    with pytest.raises(AdapterError, match="'adapter_config.json' is encrypted: upload it without a password"):
        unpack_archive(data, 1 << 20)
    with pytest.raises(AdapterError, match="is encrypted"):  # through the upload edge: a 4xx, not a crash
        AdapterRegistry(llama_spec).put("enc", adapter_files({"archive": data}, 1 << 20))


def test_zip_name_marked_utf8_but_not_utf8_rejected():
    data = zip_bytes({"adapter_config\u00e9.json": b"{}"})  # zipfile marks the name UTF-8 (flag 0x800)
    data = data.replace("\u00e9".encode(), b"\xff\xfe")
    with pytest.raises(AdapterError, match="marked UTF-8 but is not valid UTF-8"):
        unpack_archive(data, 1 << 20)


@pytest.mark.parametrize("name,match", [
    ("..\\adapter_config.json", "has an unsafe path"),
    ("C:/adapter_config.json", "has an unsafe path"),
    ("adapter_config.json\x07", "contains control characters"),
])
def test_bad_member_names_rejected(name, match):
    with pytest.raises(AdapterError, match=match):
        unpack_archive(zip_bytes({name: b"{}"}), 1 << 20)


def test_tar_name_that_is_not_utf8_rejected():
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT, encoding="latin-1") as tf:
        info = tarfile.TarInfo("adapter_config\u00ff.json")
        info.size = 2
        tf.addfile(info, io.BytesIO(b"{}"))
    with pytest.raises(AdapterError, match="is not valid UTF-8"):
        unpack_archive(buf.getvalue(), 1 << 20)


def test_zip_bomb_with_lying_header_stopped_by_the_cap_while_reading():
    payload = b"\0" * (16 << 20)
    honest = zip_bytes({"adapter_model.safetensors": payload}, zipfile.ZIP_DEFLATED)
    assert len(honest) < 64 << 10
    bomb = patch_headers(honest, size=100)  # headers claim 100 bytes; the data inflates to 16 MiB
    assert zipfile.ZipFile(io.BytesIO(bomb)).infolist()[0].file_size == 100
    def unpack() -> None:
        with pytest.raises(AdapterTooLarge, match="archive unpacks to more than max_upload_bytes 1000000"):
            unpack_archive(bomb, 1_000_000)

    start = time.perf_counter()
    peak = peak_bytes(unpack)
    assert peak < 4 << 20 and time.perf_counter() - start < 1.0  # stopped after ~1 MB, never inflated to 16 MiB


def test_zip_header_that_overstates_the_size_rejected():
    data = patch_headers(zip_bytes({"adapter_config.json": b"{}"}), size=50)
    with pytest.raises(AdapterError, match="'adapter_config.json' holds 2 bytes, its header says 50"):
        unpack_archive(data, 1 << 20)


def test_tar_gz_bomb_in_a_pax_header_stopped_by_the_cap():
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", format=tarfile.PAX_FORMAT) as tf:
        info = tarfile.TarInfo("adapter_config.json")
        info.size = 2
        info.pax_headers = {"comment": "x" * (8 << 20)}  # tarfile reads a pax header whole, before any member
        tf.addfile(info, io.BytesIO(b"{}"))
    assert len(buf.getvalue()) < 64 << 10
    def unpack() -> None:
        with pytest.raises(AdapterTooLarge, match="archive unpacks to more than max_upload_bytes 50000"):
            unpack_archive(buf.getvalue(), 50_000)

    assert peak_bytes(unpack) < 6 << 20


@pytest.mark.parametrize("data", [
    zip_bytes({"adapter_config.json": b"{}"})[:-30],  # central directory cut short
    zlib.compress(b"x" * 100),
    b"\x1f\x8b" + b"\0" * 40,  # a gzip magic number and nothing behind it
])
def test_corrupt_archives_rejected(data):
    with pytest.raises(AdapterError, match="archive is"):
        unpack_archive(data, 1 << 20)


def test_crc_mismatch_rejected():
    data = bytearray(zip_bytes({"adapter_config.json": b"{}"}))
    # the member's bytes follow its 30-byte local header and name (searching for them could hit the header's
    # timestamp, which holds the same two bytes at some times of day)
    content = 30 + len("adapter_config.json")
    assert data[content : content + 2] == b"{}"
    data[content] = ord("[")
    with pytest.raises(AdapterError, match="archive is corrupt"):
        unpack_archive(bytes(data), 1 << 20)
