"""AdapterRegistry: the published adapters by id, kept in step with the store that server replicas share."""

from __future__ import annotations

import builtins
import dataclasses
import logging
import os
import threading
from pathlib import Path

import torch

from prompt_server.adapters.convert import build_soft_prompt, check_labels
from prompt_server.adapters.loader import load_adapter_dir
from prompt_server.adapters.peft_format import ID_PATTERN, IGNORED_FILES, check_adapter_id
from prompt_server.adapters.store import AdapterStore, Signature
from prompt_server.adapters.types import ModelSpec, SoftPrompt

logger = logging.getLogger(__name__)

_RELOAD_ATTEMPTS = 3
_SWAP_WAIT = 0.5  # seconds a reader waits for the store's lock when it finds an adapter set aside (a swap under way)


def _dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype), None)
    if not isinstance(value, torch.dtype):
        raise TypeError(f"dtype {dtype!r} is not a torch dtype")
    return value


class AdapterRegistry:
    """Immutable SoftPrompt records by id, kept in step with the store.

    A lookup is one dict lookup without a store; with one, a stat or two of <store>/<id> and no lock, unless the
    adapter changed on disk and must be loaded. A writer validates the upload in memory first, so a rejected one
    never touches the disk; a valid one is written once (staged without locks) and never read back, and the
    registry's lock is held only around the final rename and the publish, so lookups never wait for an upload.
    Archives and size limits are not the registry's business: the upload edge (prompt_server.api.upload) hands
    over the adapter's files unpacked and within max_upload_bytes.
    """

    def __init__(
        self,
        spec: ModelSpec,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | str = torch.float32,
        store: Path | None = None,
        max_virtual_tokens: int = 128,
    ):
        self.spec = spec
        self.device = torch.device(device)
        self.dtype = _dtype(dtype)
        self.store = AdapterStore(store) if store is not None else None
        self.max_virtual_tokens = max_virtual_tokens
        self._records: dict[str, SoftPrompt] = {}
        # meta.json signature each record was loaded from; an id with a signature and no record failed to load
        self._signatures: dict[str, Signature | None] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        """Adapters available: with a store, its adapter directories (one directory scan, so other replicas'
        writes count) less those that failed to load here."""
        if self.store is None:
            return len(self._records)
        failed = {i for i in list(self._signatures) if i not in self._records}
        try:
            return sum(1 for adapter_id in self.store.ids() if adapter_id not in failed)
        except OSError as e:
            logger.warning("cannot scan the adapter store %s: %s", self.store.root, e)
            return len(self._records)

    def __contains__(self, adapter_id: object) -> bool:
        return isinstance(adapter_id, str) and self.get(adapter_id) is not None

    def get(self, adapter_id: str) -> SoftPrompt | None:
        """The current version of an adapter, or None; notices what other replicas wrote to the store."""
        if self.store is None:
            return self._records.get(adapter_id)
        if not ID_PATTERN.match(adapter_id):
            return None
        try:
            signature = self.store.signature(adapter_id)
            if signature is not None and signature == self._signatures.get(adapter_id):
                # _publish stores the record before its signature, so this record is at least that version
                return self._records.get(adapter_id)
            if signature is None and adapter_id not in self._signatures and not os.path.lexists(
                self.store.aside(adapter_id)
            ):
                return None  # never seen and not on disk (not even set aside by a replace)
            return self._refresh(adapter_id, signature)
        except Exception as e:  # noqa: BLE001 -- a request must never fail because of a bad store entry
            logger.warning("adapter %s in %s cannot be read, serving what was loaded before: %s",
                           adapter_id, self.store.root, e)
            return self._records.get(adapter_id)

    def list(self) -> list[SoftPrompt]:
        """Every adapter, sorted by id (with a store, after catching up with other replicas' writes)."""
        if self.store is not None:
            try:
                on_disk = set(self.store.ids())
            except OSError as e:
                logger.warning("cannot scan the adapter store %s, listing what was loaded: %s", self.store.root, e)
                on_disk = set()
            for adapter_id in on_disk | set(self._records):
                self.get(adapter_id)
        with self._lock:
            records = list(self._records.values())
        return sorted(records, key=lambda r: r.id)

    def load_store(self) -> builtins.list[tuple[str, str]]:  # `list` is a method here
        """Load every adapter in the store; a bad one is logged, skipped and returned as (id, error)."""
        if self.store is None:
            return []
        for action in self.store.sweep():
            logger.warning("store %s: %s, left by an interrupted write", self.store.root, action)
        skipped: list[tuple[str, str]] = []
        for adapter_id in self.store.ids():
            signature = None
            try:
                signature = self.store.signature(adapter_id)
                record = self._load(adapter_id)
            except Exception as e:  # noqa: BLE001 -- one bad entry must not stop the server from starting
                logger.warning("skipping adapter %s in %s: %s", adapter_id, self.store.root, e)
                skipped.append((adapter_id, str(e) or type(e).__name__))
                with self._lock:
                    if adapter_id not in self._records:
                        self._signatures[adapter_id] = signature
                continue
            with self._lock:
                self._publish(record, signature)
        logger.info("loaded %d adapter(s) from %s", len(self._records), self.store.root)
        return skipped

    def put(
        self, adapter_id: str, files: dict[str, bytes], labels: builtins.list[str] | None = None
    ) -> tuple[SoftPrompt, bool]:
        """Validate an adapter's files in memory, then write it to the store once, atomically, and publish it;
        returns (record, created). A rejected adapter raises AdapterError before anything touches the disk."""
        check_adapter_id(adapter_id)
        labels = list(check_labels(labels) or ()) or None
        kept = {name: data for name, data in files.items() if name not in IGNORED_FILES}
        record = build_soft_prompt(
            adapter_id, kept, self.spec, device=self.device, dtype=self.dtype,
            max_virtual_tokens=self.max_virtual_tokens, labels=labels,
        )
        if self.store is not None:
            return self._write(record, kept, labels)
        with self._lock:
            current = self._records.get(adapter_id)
            record = dataclasses.replace(record, version=current.version + 1 if current else 1)
            self._publish(record, None)
        return record, current is None

    def delete(self, adapter_id: str) -> bool:
        """Remove an adapter from the registry and the store; False if it did not exist."""
        check_adapter_id(adapter_id)
        if self.store is None:
            with self._lock:
                return self._records.pop(adapter_id, None) is not None
        with self.store.locked():  # always the store's lock first, then the registry's
            with self._lock:
                gone = self.store.remove(adapter_id)
                existed = self._records.pop(adapter_id, None) is not None
                self._signatures.pop(adapter_id, None)
            self.store.cleanup(gone)
        return existed or gone is not None

    def _write(
        self, record: SoftPrompt, files: dict[str, bytes], labels: builtins.list[str] | None
    ) -> tuple[SoftPrompt, bool]:
        """Persist a validated record's files (staged outside the locks, meta.json and the rename under the store's
        lock, where the version is decided) and publish the record as built from memory: nothing is read back."""
        assert self.store is not None
        adapter_id = record.id
        meta = {
            "version": 1,  # decided under the store's lock
            "created_at": record.created_at,
            "labels": labels,
            "sha256": record.sha256,
            "size_bytes": sum(len(v) for v in files.values()),
        }
        staged = self.store.stage(files)
        try:
            with self.store.locked():
                disk_version = (self.store.current_meta(adapter_id) or {}).get("version")
                disk_version = disk_version if isinstance(disk_version, int) else 0
                created = not self.store.path(adapter_id).exists()
                current = self._records.get(adapter_id)
                version = max(disk_version, current.version if current else 0) + 1
                meta["version"] = version
                record = dataclasses.replace(record, version=version)
                self.store.finalize(adapter_id, staged, meta)
                with self._lock:
                    aside = self.store.swap(adapter_id, staged)
                    self._publish(record, self.store.signature(adapter_id))
                self.store.cleanup(aside)
        except BaseException:
            self.store.discard(staged)
            raise
        return record, created

    def _load(self, adapter_id: str) -> SoftPrompt:
        assert self.store is not None
        return load_adapter_dir(
            self.store.path(adapter_id), self.spec, device=self.device, dtype=self.dtype,
            max_virtual_tokens=self.max_virtual_tokens,
        )

    def _stable_signature(self, adapter_id: str) -> Signature | None:
        """The meta.json signature, after waiting out another writer's swap (rename old aside, rename new in) or
        repairing a swap whose writer died between its renames."""
        assert self.store is not None
        signature = self.store.signature(adapter_id)
        if signature is None and self.store.restore(adapter_id, timeout=_SWAP_WAIT):
            logger.warning("store %s: restored %s, left aside by an interrupted replace", self.store.root, adapter_id)
        return signature if signature is not None else self.store.signature(adapter_id)

    def _refresh(self, adapter_id: str, signature: Signature | None) -> SoftPrompt | None:
        """Bring one id in step with the store after its meta.json changed, appeared or vanished.

        Loads without the lock; publishes under it only if the store still holds the version that was loaded."""
        assert self.store is not None
        for _ in range(_RELOAD_ATTEMPTS):
            if signature is None:
                signature = self._stable_signature(adapter_id)
            if signature is None:
                if adapter_id in self._records and os.path.lexists(self.store.aside(adapter_id)):
                    return self._records[adapter_id]  # a swap still under way: keep serving the last version
                with self._lock:
                    if self.store.signature(adapter_id) is None:
                        self._records.pop(adapter_id, None)
                        self._signatures.pop(adapter_id, None)
                        return None
                signature = self.store.signature(adapter_id)
                continue
            if signature == self._signatures.get(adapter_id):
                return self._records.get(adapter_id)
            try:
                record = self._load(adapter_id)
            except Exception as e:  # noqa: BLE001 -- a broken store entry must not fail the request
                after = self._stable_signature(adapter_id)
                if after != signature:  # replaced while we read it: try the newer version
                    signature = after
                    continue
                logger.warning("adapter %s in the store cannot be loaded, keeping what was served: %s",
                               adapter_id, e)
                with self._lock:
                    if self.store.signature(adapter_id) == signature:
                        self._signatures[adapter_id] = signature  # do not retry this version on every lookup
                return self._records.get(adapter_id)
            with self._lock:
                after = self.store.signature(adapter_id)
                if after == signature:  # nothing changed while we read: a whole version
                    self._publish(record, signature)
                    return record
            signature = after
        return self._records.get(adapter_id)

    def _publish(self, record: SoftPrompt, signature: Signature | None) -> None:
        self._records[record.id] = record
        self._signatures[record.id] = signature
