"""The on-disk adapter store, shared by server replicas: <store>/<id>/{adapter files, meta.json}.

Writes stage a complete directory under a hidden temp name inside the store and rename it into place, so a reader
sees either the old or the new version of an adapter, never a mix. A file lock serialises writers across processes.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prompt_server.adapters.loader import META_FILE
from prompt_server.adapters.peft_format import CONFIG_FILE, ID_PATTERN

Signature = tuple[int, int, int]  # (inode, mtime_ns, size) of meta.json: changes whenever a version is published


class AdapterStore:
    """Directory operations of the store; knows nothing about tensors."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the store's inter-process write lock."""
        with open(self.root / ".lock", "a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def path(self, adapter_id: str) -> Path:
        return self.root / adapter_id

    def signature(self, adapter_id: str) -> Signature | None:
        """One stat of the adapter's meta.json (adapter_config.json for a plain PEFT directory); None if absent."""
        for name in (META_FILE, CONFIG_FILE):
            try:
                st = os.stat(os.path.join(self.root, adapter_id, name))
            except (FileNotFoundError, NotADirectoryError):
                continue
            return (st.st_ino, st.st_mtime_ns, st.st_size)
        return None

    def ids(self) -> list[str]:
        """Ids of the adapter directories in the store (hidden staging directories excluded)."""
        return sorted(e.name for e in os.scandir(self.root) if e.is_dir() and ID_PATTERN.match(e.name))

    def sweep(self, max_age: float = 3600.0) -> list[str]:
        """Delete staging and set-aside directories older than max_age seconds (left by a crashed writer)."""
        removed = []
        now = time.time()
        for entry in os.scandir(self.root):
            stale = now - entry.stat().st_mtime > max_age
            if entry.is_dir() and entry.name.startswith((".tmp-", ".old-")) and stale:
                shutil.rmtree(entry.path, ignore_errors=True)
                removed.append(entry.name)
        return removed

    def read_meta(self, adapter_id: str) -> dict[str, Any] | None:
        try:
            meta = json.loads((self.path(adapter_id) / META_FILE).read_text("utf-8"))
        except (FileNotFoundError, NotADirectoryError, ValueError):
            return None
        return meta if isinstance(meta, dict) else None

    def replacing(self, adapter_id: str) -> bool:
        """True while a writer has moved the old version aside and not yet renamed the new one in."""
        return any(self.root.glob(f".old-{adapter_id}-" + "?" * 32))

    def stage(self, adapter_id: str, files: dict[str, bytes], meta: dict[str, Any]) -> Path:
        """Write files + meta.json into a fresh hidden directory inside the store and return it."""
        tmp = self.root / f".tmp-{uuid.uuid4().hex}"
        tmp.mkdir()
        try:
            for name, data in {**files, META_FILE: json.dumps(meta, indent=2).encode()}.items():
                with open(tmp / name, "wb") as fh:
                    fh.write(data)
                    fh.flush()
                    os.fsync(fh.fileno())
            # file-system timestamps tick coarsely and inodes get reused: give every version's meta.json an
            # mtime of its own, so (inode, mtime, size) never repeats for one id
            previous = self.signature(adapter_id)
            mtime_ns = max(time.time_ns(), previous[1] + 1 if previous else 0)
            os.utime(tmp / META_FILE, ns=(mtime_ns, mtime_ns))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return tmp

    def commit(self, adapter_id: str, staged: Path) -> None:
        """Move a staged directory into place, replacing any current version (rename aside, rename in, delete old)."""
        target = self.path(adapter_id)
        aside = None
        if target.exists():
            aside = self.root / f".old-{adapter_id}-{uuid.uuid4().hex}"
            os.rename(target, aside)
        try:
            os.rename(staged, target)
        except BaseException:
            if aside is not None:
                os.rename(aside, target)
            raise
        self._sync_dir()
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)

    def discard(self, staged: Path) -> None:
        shutil.rmtree(staged, ignore_errors=True)

    def delete(self, adapter_id: str) -> bool:
        """Remove an adapter directory; False if there was none."""
        target = self.path(adapter_id)
        if not target.exists():
            return False
        aside = self.root / f".old-{adapter_id}-{uuid.uuid4().hex}"
        os.rename(target, aside)
        self._sync_dir()
        shutil.rmtree(aside, ignore_errors=True)
        return True

    def _sync_dir(self) -> None:
        fd = os.open(self.root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
