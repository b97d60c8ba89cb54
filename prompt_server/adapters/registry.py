"""AdapterRegistry: the published adapters by id, kept in step with the store that server replicas share."""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from pathlib import Path

import torch

from prompt_server.adapters.archive import unpack_archive
from prompt_server.adapters.convert import build_soft_prompt, check_labels
from prompt_server.adapters.errors import AdapterError, AdapterTooLarge
from prompt_server.adapters.loader import load_adapter_dir
from prompt_server.adapters.peft_format import ID_PATTERN, IGNORED_FILES, check_adapter_id, split_files
from prompt_server.adapters.store import AdapterStore, Signature
from prompt_server.adapters.types import ModelSpec, SoftPrompt

logger = logging.getLogger(__name__)

_RELOAD_ATTEMPTS = 3
_SWAP_WAIT = 0.05  # seconds a reader waits for another replica to finish swapping an adapter's directory


def _dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype), None)
    if not isinstance(value, torch.dtype):
        raise TypeError(f"dtype {dtype!r} is not a torch dtype")
    return value


class AdapterRegistry:
    """Immutable SoftPrompt records by id. Reads are one dict lookup (plus one stat with a store); writes are locked."""

    def __init__(
        self,
        spec: ModelSpec,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | str = torch.float32,
        store: Path | None = None,
        max_virtual_tokens: int = 128,
        max_upload_bytes: int = 64 * 1024 * 1024,
    ):
        self.spec = spec
        self.device = torch.device(device)
        self.dtype = _dtype(dtype)
        self.store = AdapterStore(store) if store is not None else None
        self.max_virtual_tokens = max_virtual_tokens
        self.max_upload_bytes = max_upload_bytes
        self._records: dict[str, SoftPrompt] = {}
        self._signatures: dict[str, Signature | None] = {}  # meta.json signature each record was loaded from
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._records)

    def __contains__(self, adapter_id: object) -> bool:
        return isinstance(adapter_id, str) and self.get(adapter_id) is not None

    def get(self, adapter_id: str) -> SoftPrompt | None:
        """The current version of an adapter, or None; notices what other replicas wrote to the store."""
        if self.store is None:
            return self._records.get(adapter_id)
        if not ID_PATTERN.match(adapter_id):
            return None
        signature = self.store.signature(adapter_id)
        if signature is not None and signature == self._signatures.get(adapter_id):
            # _publish stores the record before its signature, so this record is at least that version
            return self._records.get(adapter_id)
        return self._refresh(adapter_id, signature)

    def list(self) -> list[SoftPrompt]:
        """Every adapter, sorted by id (with a store, after catching up with other replicas' writes)."""
        if self.store is not None:
            for adapter_id in set(self.store.ids()) | set(self._records):
                self.get(adapter_id)
        return sorted(self._records.values(), key=lambda r: r.id)

    def load_store(self) -> list[tuple[str, str]]:
        """Load every adapter in the store; a bad one is logged, skipped and returned as (id, error)."""
        if self.store is None:
            return []
        for name in self.store.sweep():
            logger.info("removed %s, left in %s by an interrupted write", name, self.store.root)
        skipped: list[tuple[str, str]] = []
        for adapter_id in self.store.ids():
            try:
                signature = self.store.signature(adapter_id)
                record = self._load(adapter_id)
            except (AdapterError, OSError) as e:
                logger.warning("skipping adapter %s in %s: %s", adapter_id, self.store.root, e)
                skipped.append((adapter_id, str(e)))
                continue
            with self._lock:
                self._publish(record, signature)
        logger.info("loaded %d adapter(s) from %s", len(self._records), self.store.root)
        return skipped

    def put(
        self, adapter_id: str, files: dict[str, bytes], labels: list[str] | None = None
    ) -> tuple[SoftPrompt, bool]:
        """Validate, persist atomically and publish an adapter; returns (record, created)."""
        check_adapter_id(adapter_id)
        files = self._unpack(files)
        labels = list(check_labels(labels) or ()) or None
        weights = split_files(files)[2]
        kept = {name: data for name, data in files.items() if name not in IGNORED_FILES}
        with self._lock:
            if self.store is None:
                current = self._records.get(adapter_id)
                version = current.version + 1 if current else 1
                record = build_soft_prompt(
                    adapter_id, kept, self.spec, device=self.device, dtype=self.dtype,
                    max_virtual_tokens=self.max_virtual_tokens, version=version, labels=labels,
                )
                self._publish(record, None)
                return record, current is None
            with self.store.locked():
                return self._put_stored(adapter_id, kept, labels, hashlib.sha256(weights).hexdigest())

    def delete(self, adapter_id: str) -> bool:
        """Remove an adapter from the registry and the store; False if it did not exist."""
        check_adapter_id(adapter_id)
        with self._lock:
            existed = self._records.pop(adapter_id, None) is not None
            self._signatures.pop(adapter_id, None)
            if self.store is not None:
                with self.store.locked():
                    existed = self.store.delete(adapter_id) or existed
            return existed

    def _unpack(self, files: dict[str, bytes]) -> dict[str, bytes]:
        total = sum(len(v) for v in files.values())
        if total > self.max_upload_bytes:
            raise AdapterTooLarge(f"upload of {total} bytes is larger than max_upload_bytes {self.max_upload_bytes}")
        if "archive" in files:
            if len(files) != 1:
                raise AdapterError(f"an archive upload takes no other files, got {sorted(set(files) - {'archive'})}")
            return unpack_archive(files["archive"], self.max_upload_bytes)
        return files

    def _put_stored(
        self, adapter_id: str, files: dict[str, bytes], labels: list[str] | None, sha256: str
    ) -> tuple[SoftPrompt, bool]:
        assert self.store is not None
        on_disk = self.store.read_meta(adapter_id)
        created = on_disk is None and not self.store.path(adapter_id).exists()
        current = self._records.get(adapter_id)
        disk_version = (on_disk or {}).get("version")
        disk_version = disk_version if isinstance(disk_version, int) else 0
        version = max(disk_version, current.version if current else 0) + 1
        meta = {
            "version": version,
            "created_at": time.time(),
            "labels": labels,
            "sha256": sha256,
            "size_bytes": sum(len(v) for v in files.values()),
        }
        staged = self.store.stage(adapter_id, files, meta)
        try:
            record = load_adapter_dir(
                staged, self.spec, device=self.device, dtype=self.dtype,
                max_virtual_tokens=self.max_virtual_tokens, adapter_id=adapter_id,
            )
            self.store.commit(adapter_id, staged)
        except BaseException:
            self.store.discard(staged)
            raise
        self._publish(record, self.store.signature(adapter_id))
        return record, created

    def _load(self, adapter_id: str) -> SoftPrompt:
        assert self.store is not None
        return load_adapter_dir(
            self.store.path(adapter_id), self.spec, device=self.device, dtype=self.dtype,
            max_virtual_tokens=self.max_virtual_tokens,
        )

    def _stable_signature(self, adapter_id: str) -> Signature | None:
        """The meta.json signature, waiting out another replica's swap (rename old aside, rename new in)."""
        assert self.store is not None
        deadline = time.monotonic() + _SWAP_WAIT
        while True:
            signature = self.store.signature(adapter_id)
            if signature is not None:
                return signature
            if not self.store.replacing(adapter_id):
                # the old copy is deleted only after the new one is renamed in, so look once more
                return self.store.signature(adapter_id)
            if time.monotonic() > deadline:
                return None
            time.sleep(0.001)

    def _refresh(self, adapter_id: str, signature: Signature | None) -> SoftPrompt | None:
        """Bring one id in step with the store after its meta.json changed, appeared or vanished."""
        assert self.store is not None
        with self._lock:
            if signature is None:
                signature = self._stable_signature(adapter_id)
                if signature is None and adapter_id in self._records and self.store.replacing(adapter_id):
                    return self._records[adapter_id]  # a swap left unfinished: keep serving the last version
            for _ in range(_RELOAD_ATTEMPTS):
                current = self._records.get(adapter_id)
                if signature is None:
                    self._records.pop(adapter_id, None)
                    self._signatures.pop(adapter_id, None)
                    return None
                if signature == self._signatures.get(adapter_id):
                    return current
                try:
                    record = self._load(adapter_id)
                except (AdapterError, OSError) as e:
                    after = self._stable_signature(adapter_id)
                    if after != signature:  # replaced while we read it: try the newer version
                        signature = after
                        continue
                    logger.warning("adapter %s in the store cannot be loaded, keeping what was served: %s",
                                   adapter_id, e)
                    self._signatures[adapter_id] = signature
                    return current
                after = self._stable_signature(adapter_id)
                if after == signature:  # nothing changed while we read: a whole version
                    self._publish(record, signature)
                    return record
                signature = after
            return self._records.get(adapter_id)

    def _publish(self, record: SoftPrompt, signature: Signature | None) -> None:
        self._records[record.id] = record
        self._signatures[record.id] = signature
