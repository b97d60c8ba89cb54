"""What a put does to the disk, seen through the interpreter's audit events (every open, mkdir, rename, utime,
remove): a rejected adapter touches nothing; a valid one is written once, each file once, and never read back."""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as save_st

from prompt_server.adapters import loader
from prompt_server.adapters import registry as registry_module
from prompt_server.adapters.errors import AdapterError
from prompt_server.adapters.registry import AdapterRegistry
from prompt_server.adapters.store import AdapterStore

# file-system events of the audit table (https://docs.python.org/3/library/audit_events.html) a write can raise
FS_EVENTS = {"open", "os.mkdir", "os.rename", "os.remove", "os.rmdir", "os.utime", "os.link", "os.symlink",
             "os.truncate", "os.chmod", "shutil.rmtree", "shutil.copyfile", "shutil.move"}
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
TWO_PATHS = {"os.rename", "os.link", "os.symlink", "shutil.copyfile", "shutil.move"}  # (source, destination)
ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"}

_recording: list[tuple[str, tuple]] | None = None  # the events seen while a `recording` block runs
_installed = False


def _hook(event: str, args: tuple) -> None:
    if _recording is not None and event in FS_EVENTS:
        _recording.append((event, args))


@contextmanager
def recording(root: Path) -> Iterator[list[tuple[str, tuple[str, ...], bool]]]:
    """Yields the file-system events raised inside the block that name a path under root, as (event, paths relative
    to root, writes); fd-only events (utime on an open handle) name no path and are left out."""
    global _recording, _installed
    if not _installed:  # an audit hook cannot be removed: one for the session, idle outside `recording`
        sys.addaudithook(_hook)
        _installed = True
    seen: list[tuple[str, tuple]] = []
    out: list[tuple[str, tuple[str, ...], bool]] = []
    _recording = seen
    try:
        yield out
    finally:
        _recording = None
    prefix = os.fspath(root) + os.sep
    for event, args in seen:
        named = [a for a in args[: 2 if event in TWO_PATHS else 1] if isinstance(a, (str, bytes, os.PathLike))]
        paths = [os.fsdecode(os.fspath(a)) for a in named]
        if not any((path + os.sep).startswith(prefix) for path in paths):
            continue
        if event == "open":
            mode, flags = args[1], args[2]
            writes = any(c in mode for c in "wxa+") if isinstance(mode, str) else bool(flags & WRITE_FLAGS)
        else:
            writes = True
        out.append((event, tuple(os.path.relpath(path, root) for path in paths), writes))


def listing(root: Path) -> dict[str, tuple[int, int, bytes]]:
    """Every entry under root, hidden ones included, with its inode, mtime and (for files) content."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.stat(path, follow_symlinks=False)
            content = Path(path).read_bytes() if name in filenames else b""
            out[os.path.relpath(path, root)] = (st.st_ino, st.st_mtime_ns, content)
    return out


def forbid_store_writes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every store write, and the store's lock, fail the test."""

    def forbidden(*args, **kwargs):
        pytest.fail("a rejected upload reached the store")

    for name in ("stage", "finalize", "swap", "locked", "cleanup", "remove"):
        monkeypatch.setattr(AdapterStore, name, forbidden)


@pytest.fixture
def no_read_back(monkeypatch):
    """Make the store's read path (what loads an adapter from disk) fail loudly."""

    def forbidden(*args, **kwargs):
        raise AssertionError("put read an adapter back from the store")

    monkeypatch.setattr(loader, "read_dir_files", forbidden)
    monkeypatch.setattr(loader, "load_adapter_dir", forbidden)
    monkeypatch.setattr(registry_module, "load_adapter_dir", forbidden)
    monkeypatch.setattr(AdapterRegistry, "_load", forbidden)


def _rejected(peft_files) -> list[tuple[dict[str, bytes], list[str] | None, str]]:
    files = peft_files()
    return [
        ({**files, "adapter_config.json": json.dumps({"peft_type": "LORA"}).encode()}, None,
         "not a soft-prompt adapter"),
        ({**files, "adapter_model.safetensors": save_st({"prompt_embeddings": torch.zeros(4, 7)})}, None,
         r"prompt_embeddings has shape \[4, 7\]"),
        ({**files, "adapter_model.safetensors": b"not safetensors"}, None, "not a valid safetensors file"),
        ({"adapter_config.json": files["adapter_config.json"]}, None, "weights file is missing"),
        ({**files, "notes.txt": b"x"}, None, r"unknown file\(s\) notes.txt"),
        (files, ["a", "a"], "labels must be unique"),
    ]


@pytest.mark.parametrize("existing", [False, True])
def test_a_rejected_upload_never_touches_the_disk(llama_spec, peft_files, tmp_path, existing, monkeypatch):
    root = tmp_path / "store"
    registry = AdapterRegistry(llama_spec, store=root)
    if existing:
        registry.put("x", peft_files(seed=1))
    before, record = listing(root), registry.get("x")
    with monkeypatch.context() as m:
        forbid_store_writes(m)
        for files, labels, match in _rejected(peft_files):
            with recording(tmp_path) as events, pytest.raises(AdapterError, match=match):
                registry.put("x", files, labels)
            assert events == [], f"{match}: the store was touched: {events}"
    assert listing(root) == before  # nothing created, renamed, rewritten or left behind, hidden entries included
    assert registry.get("x") is record


def test_a_rejected_upload_without_a_store_changes_nothing(llama_spec, peft_files, tmp_path):
    registry = AdapterRegistry(llama_spec)
    for files, labels, match in _rejected(peft_files):
        with recording(tmp_path) as events, pytest.raises(AdapterError, match=match):
            registry.put("x", files, labels)
        assert events == []
    assert registry.get("x") is None and len(registry) == 0


def test_a_valid_upload_is_written_once_and_never_read_back(llama_spec, peft_files, tmp_path, no_read_back):
    root = tmp_path / "store"
    registry = AdapterRegistry(llama_spec, store=root)
    for version, seed in ((1, 1), (2, 2)):  # a create, then a replace
        files = peft_files(seed=seed)
        with recording(root) as events:
            record, created = registry.put("x", {**files, "README.md": b"model card"}, ["a", "b"])
        assert created == (version == 1) and record.version == version and registry.get("x") is record

        opened = [(paths[0], w) for event, paths, w in events if event == "open"]
        # the store's root and its .lock are opened (and the root made sure of) by the file lock
        writes = Counter(path for path, w in opened if w and path not in (".", ".lock"))
        (staged,) = {os.path.dirname(path) for path in writes}
        assert staged.startswith(".tmp-")
        # each file of the version written once (README.md, which the server ignores, not at all)
        assert writes == Counter({f"{staged}/{name}": 1 for name in [*files, "meta.json"]}), writes
        # the only file read is the current version's meta.json, for its version number: the upload's own files are
        # never opened for reading, staged or renamed in
        assert [path for path, w in opened if not w and os.path.basename(path) in ADAPTER_FILES] == []
        assert [path for path, w in opened if not w and os.path.basename(path) == "meta.json"] == ["x/meta.json"]
        renames = [paths for event, paths, _ in events if event == "os.rename"]
        assert renames[-1] == (staged, "x")  # the staged directory goes into place with one rename
        assert renames[:-1] == ([] if version == 1 else [("x", ".old-x")])
        assert not any(p.startswith((".tmp-", ".old-")) for p in os.listdir(root))

    meta = json.loads((root / "x" / "meta.json").read_text())
    assert meta == {"version": 2, "created_at": record.created_at, "labels": ["a", "b"], "sha256": record.sha256,
                    "size_bytes": record.size_bytes}
    assert sorted(os.listdir(root / "x")) == ["adapter_config.json", "adapter_model.safetensors", "meta.json"]


def test_what_was_published_is_what_other_replicas_load(llama_spec, peft_files, tmp_path):
    writer = AdapterRegistry(llama_spec, store=tmp_path)
    record, _ = writer.put("sent", peft_files(task_type="SEQ_CLS"), labels=["neg", "pos"])
    loaded = AdapterRegistry(llama_spec, store=tmp_path).get("sent")
    for field in ("id", "version", "sha256", "size_bytes", "created_at", "labels", "peft_type", "task_type",
                  "num_virtual_tokens", "base_model", "extra"):
        assert getattr(loaded, field) == getattr(record, field), field
    assert torch.equal(loaded.virtual_tokens, record.virtual_tokens)
    assert loaded.classifier.params.keys() == record.classifier.params.keys()
    for name, value in record.classifier.params.items():
        assert torch.equal(loaded.classifier.params[name], value)
