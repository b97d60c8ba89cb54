"""The on-disk adapter store, shared by server replicas: <store>/<id>/{adapter files, meta.json}.

Only adapters already validated in memory are written, and each file once: stage() writes the adapter files into a
hidden temp directory inside the store (no lock held); under the store's file lock, finalize() adds meta.json with
the version decided there, fsyncs the directory, and swap() renames it into place, so a reader sees either the old
or the new version of an adapter, never a mix. Nothing written is read back. A replace renames the current version
aside to `.old-<id>` and the new one in; a crash between the two renames leaves `.old-<id>` as the only copy, which
restore() (any reader that finds `<id>` missing beside it) or sweep() (at start-up) renames back. Other replicas notice
a new version by its meta.json's signature.

What a process killed at any point leaves (tests/e2e/test_crash_safety.py kills at every step): `<id>` is always a
whole version. While `<id>` is absent, `.old-<id>` is whole too, and the adapter's current version: a write
supersedes it only by renaming its own in first, a delete removes it, sweep() restores it. While `<id>` exists,
`.old-<id>` is a leftover, perhaps half deleted, which anything that takes `<id>` away deletes first (renamed to
`.del-*`, so never half). `.del-*` are being deleted; `.tmp-*` were never published.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from prompt_server.adapters.loader import META_FILE
from prompt_server.adapters.peft_format import CONFIG_FILE, ID_PATTERN

Signature = tuple[int, int, int]  # (inode, mtime_ns, size) of meta.json: changes whenever a version is published

_ASIDE = re.compile(r"^\.old-(.+?)(?:-[0-9a-f]{32})?$")  # `.old-<id>`; `-<uuid hex>` as earlier versions named it


class AdapterStore:
    """Directory operations of the store; knows nothing about tensors."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    @contextmanager
    def locked(self, timeout: float = -1) -> Iterator[None]:
        """Hold the store's inter-process write lock (an exclusive flock on <store>/.lock; not reentrant). With a
        timeout (seconds), raise filelock.Timeout if it is not free by then. The kernel drops a killed holder's lock."""
        # A new FileLock per call, as a new open file was before: a FileLock instance is reentrant, so a shared one
        # would let a nested holder (or, with thread_local=False, another thread) in instead of excluding it.
        with FileLock(self.root / ".lock", timeout=timeout):
            yield

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
        """Clean up after crashed writers: restore a replaced adapter whose new version never arrived, delete
        leftovers of finished writes and staging directories older than max_age seconds. Returns what it did."""
        done = []
        with self.locked():  # no writer is between its two renames while we hold the lock
            asides: dict[str, list[tuple[float, str]]] = {}
            for entry in os.scandir(self.root):
                try:
                    if not entry.is_dir(follow_symlinks=False) or not entry.name.startswith((".tmp-", ".old-", ".del-")):
                        continue
                    mtime = entry.stat(follow_symlinks=False).st_mtime
                except OSError:  # removed meanwhile, e.g. by another replica's sweep
                    continue
                m = _ASIDE.match(entry.name)
                if m and ID_PATTERN.match(m.group(1)):
                    asides.setdefault(m.group(1), []).append((mtime, entry.name))
                elif entry.name.startswith(".del-") or time.time() - mtime > max_age:
                    shutil.rmtree(entry.path, ignore_errors=True)
                    done.append(f"removed {entry.name}")
            for adapter_id, names in asides.items():
                names.sort(reverse=True)
                if not os.path.lexists(self.path(adapter_id)):
                    try:
                        os.rename(self.root / names[0][1], self.path(adapter_id))
                        done.append(f"restored {adapter_id} from {names[0][1]}")
                        names = names[1:]
                    except OSError:
                        pass
                for _, name in names:
                    self._delete(self.root / name, adapter_id)
                    done.append(f"removed {name}")
            if done:
                self._sync_dir()
        return done

    def read_meta(self, adapter_id: str) -> dict[str, Any] | None:
        try:
            meta = json.loads((self.path(adapter_id) / META_FILE).read_text("utf-8"))
        except (FileNotFoundError, NotADirectoryError, ValueError):
            return None
        return meta if isinstance(meta, dict) else None

    def current_meta(self, adapter_id: str) -> dict[str, Any] | None:
        """meta.json of the adapter's current version: `<id>`'s, else that of a `.old-<id>` a crashed replace left
        as the only copy (call under locked(), where no replace is under way)."""
        meta = self.read_meta(adapter_id)
        aside = self.aside(adapter_id)
        if meta is None and not os.path.lexists(self.path(adapter_id)) and os.path.lexists(aside):
            meta = self.read_meta(aside.name)
        return meta

    def aside(self, adapter_id: str) -> Path:
        """Where a replace moves the current version while it renames the new one in."""
        return self.root / f".old-{adapter_id}"

    def restore(self, adapter_id: str, timeout: float) -> bool:
        """Repair on read: if `<id>` is missing and `.old-<id>` is not, either a replace is between its two renames
        (it holds the store's lock) or its writer died there (the kernel released the lock). Wait up to timeout
        seconds for the lock; under it, a `.old-<id>` still alone is a dead writer's and the adapter's current
        version: rename it back. True if it did; False if nothing needed it or the lock stayed busy."""
        target, aside = self.path(adapter_id), self.aside(adapter_id)
        if os.path.lexists(target) or not os.path.lexists(aside):
            return False
        try:
            with self.locked(timeout=timeout):
                if os.path.lexists(target) or not os.path.lexists(aside):
                    return False  # the writer finished while we waited
                os.rename(aside, target)
                self._sync_dir()
                return True
        except Timeout:
            return False

    def stage(self, files: dict[str, bytes]) -> Path:
        """Write an adapter's files, each once and fsynced, into a fresh hidden directory inside the store; return
        it for finalize() and swap() (no lock needed: no reader looks at hidden directories)."""
        tmp = self.root / f".tmp-{uuid.uuid4().hex}"
        tmp.mkdir()
        try:
            for name, data in files.items():
                _write(tmp / name, data)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return tmp

    def finalize(self, adapter_id: str, staged: Path, meta: dict[str, Any]) -> None:
        """Write the staged version's meta.json, once, with its final fields, and make the directory durable; call
        under locked(), right before swap()."""
        # file-system timestamps tick coarsely and inodes get reused: give every version's meta.json an
        # mtime of its own, so (inode, mtime, size) never repeats for one id
        previous = self.signature(adapter_id)
        mtime_ns = max(time.time_ns(), previous[1] + 1 if previous else 0)
        _write(staged / META_FILE, _meta_bytes(meta), mtime_ns=mtime_ns)
        _sync_dir(staged)

    def swap(self, adapter_id: str, staged: Path) -> Path | None:
        """Rename a staged directory into place (current version aside first); call under locked().

        Returns the set-aside old version for cleanup(), or None if there was none."""
        target, aside = self.path(adapter_id), self.aside(adapter_id)
        if os.path.lexists(aside):  # a crashed writer's (no swap is under way while we hold the lock)
            if not os.path.lexists(target):
                # the only copy of the current version: the new one goes in first, then this one goes, so that a
                # crash in between leaves a whole version in place, never nothing (sweep() would restore nothing)
                os.rename(staged, target)
                return aside
            self._delete(aside, adapter_id)  # a finished replace's leftover
        had_target = target.exists()
        if had_target:
            os.rename(target, aside)
        try:
            os.rename(staged, target)
        except BaseException:
            if had_target:
                os.rename(aside, target)
            raise
        return aside if had_target else None

    def cleanup(self, aside: Path | None) -> None:
        """Make the renames durable and delete the old version (call under locked())."""
        self._sync_dir()
        if aside is not None:
            # in place: the new version is in `<id>` by now, and whatever takes `<id>` away again (swap(), remove(),
            # sweep()) first deletes a `.old-<id>` that a crash here left half deleted
            shutil.rmtree(aside, ignore_errors=True)

    def discard(self, staged: Path) -> None:
        shutil.rmtree(staged, ignore_errors=True)

    def remove(self, adapter_id: str) -> Path | None:
        """Rename an adapter directory out of sight (call under locked()); returns it for cleanup(), None if absent.

        A `.old-<id>` goes first: a leftover while `<id>` exists (else a crash after the rename of `<id>` would leave
        it for sweep() to restore: a deleted adapter back, in an older version), the current version while not."""
        target, aside = self.path(adapter_id), self.aside(adapter_id)
        if os.path.lexists(aside):
            if os.path.lexists(target):
                self._delete(aside, adapter_id)
            else:
                target = aside
        if not os.path.lexists(target):
            return None
        gone = self.root / f".del-{adapter_id}-{uuid.uuid4().hex}"
        os.rename(target, gone)
        return gone

    def _delete(self, path: Path, name: str) -> None:
        """Delete a directory, renamed to `.del-*` first: killed halfway, it leaves a `.del-*` for sweep(), never a
        partial `.old-<id>` that sweep() could take for a version to restore. Under locked()."""
        if not path.name.startswith(".del-"):
            gone = self.root / f".del-{name.removeprefix('.old-')}-{uuid.uuid4().hex}"
            try:
                os.rename(path, gone)
            except FileNotFoundError:
                return
            path = gone
        shutil.rmtree(path, ignore_errors=True)

    def _sync_dir(self) -> None:
        _sync_dir(self.root)


def _meta_bytes(meta: dict[str, Any]) -> bytes:
    return json.dumps(meta, indent=2).encode()


def _sync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write(path: Path, data: bytes, mtime_ns: int | None = None) -> None:
    """Create path (it must not exist: every file of a version is written once), set its mtime, fsync it."""
    with open(path, "xb") as fh:
        fh.write(data)
        fh.flush()
        if mtime_ns is not None:
            os.utime(fh.fileno(), ns=(mtime_ns, mtime_ns))
        os.fsync(fh.fileno())
