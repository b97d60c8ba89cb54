"""The store after crashes and under concurrency: sweep, interrupted replaces, start-up with bad entries, len()."""

from __future__ import annotations

import json
import os
import threading
import time

import torch
from safetensors.torch import save as save_st

from prompt_server.adapters.registry import _SWAP_WAIT, AdapterRegistry
from prompt_server.adapters.store import AdapterStore
from prompt_server.adapters.types import ModelSpec


def test_crash_between_the_renames_of_a_replace_is_restored(llama_spec, peft_files, tmp_path):
    writer = AdapterRegistry(llama_spec, store=tmp_path)
    first, _ = writer.put("x", peft_files(seed=1))
    os.rename(tmp_path / "x", writer.store.aside("x"))  # the old version set aside, the new one never renamed in
    fresh = AdapterRegistry(llama_spec, store=tmp_path)
    assert fresh.load_store() == []
    restored = fresh.get("x")
    assert restored is not None and restored.sha256 == first.sha256 and restored.version == 1
    assert not writer.store.aside("x").exists()


def test_sweep_restores_the_earlier_aside_naming_and_drops_extra_copies(llama_spec, peft_files, tmp_path):
    writer = AdapterRegistry(llama_spec, store=tmp_path)
    writer.put("x", peft_files(seed=1))
    os.rename(tmp_path / "x", tmp_path / (".old-x-" + "a" * 32))
    (tmp_path / (".old-y-" + "b" * 32)).mkdir()
    (tmp_path / "y").mkdir()  # y exists: its set-aside copy is a leftover of a finished replace
    done = AdapterStore(tmp_path).sweep()
    assert (tmp_path / "x" / "meta.json").exists() and not (tmp_path / (".old-y-" + "b" * 32)).exists()
    assert sorted(done) == ["removed .old-y-" + "b" * 32, "restored x from .old-x-" + "a" * 32]


def test_crash_during_delete_does_not_bring_the_adapter_back(llama_spec, peft_files, tmp_path):
    writer = AdapterRegistry(llama_spec, store=tmp_path)
    writer.put("x", peft_files())
    gone = writer.store.remove("x")  # renamed out of sight, then the process died before deleting it
    assert gone is not None and gone.exists()
    fresh = AdapterRegistry(llama_spec, store=tmp_path)
    fresh.load_store()
    assert fresh.get("x") is None and not gone.exists() and len(fresh) == 0


def test_a_swap_under_way_is_waited_on_and_a_dead_writers_is_repaired_on_read(llama_spec, peft_files, tmp_path):
    a = AdapterRegistry(llama_spec, store=tmp_path)
    record, _ = a.put("x", peft_files())
    b = AdapterRegistry(llama_spec, store=tmp_path)  # another replica, which never saw x
    aside = a.store.aside("x")
    held, release = threading.Event(), threading.Event()

    def writer() -> None:  # a live replace, between its two renames, holding the store's lock
        with AdapterStore(tmp_path).locked():
            os.rename(tmp_path / "x", aside)
            held.set()
            release.wait(10)

    t = threading.Thread(target=writer)
    t.start()
    assert held.wait(10)
    start = time.perf_counter()
    assert a.get("x") is record  # keeps serving the version it has while the lock is busy
    assert b.get("x") is None  # nothing to serve yet, and nothing repaired under a live writer
    waited = time.perf_counter() - start
    assert 2 * _SWAP_WAIT * 0.9 < waited < 2 * _SWAP_WAIT + 1.0  # each waited for the lock, bounded
    assert aside.exists() and not (tmp_path / "x").exists()
    release.set()  # the writer "dies" without renaming anything in: the kernel drops its lock with it
    t.join()
    start = time.perf_counter()
    got = b.get("x")  # repaired on read: no restart, no sweep, no waiting
    assert got is not None and got.sha256 == record.sha256 and got.version == 1
    assert time.perf_counter() - start < _SWAP_WAIT and (tmp_path / "x").exists() and not aside.exists()
    assert a.get("x") is record
    record2, created = a.put("x", peft_files(seed=3))
    assert not created and record2.version == 2 and b.get("x").sha256 == record2.sha256


def test_sweep_survives_entries_vanishing_under_it(tmp_path):
    store = AdapterStore(tmp_path)
    os.symlink(tmp_path / "nowhere", tmp_path / ".tmp-dangling")  # stat() of it fails like a removed entry's
    stop = threading.Event()

    def churn() -> None:  # another replica staging and cleaning up
        i = 0
        while not stop.is_set():
            path = tmp_path / f".tmp-churn{i % 50}"
            try:
                path.mkdir()
                os.utime(path, (0, 0))
                path.rmdir()
            except OSError:
                pass
            i += 1

    thread = threading.Thread(target=churn)
    thread.start()
    try:
        for _ in range(200):
            store.sweep()
    finally:
        stop.set()
        thread.join()
    assert os.path.islink(tmp_path / ".tmp-dangling")


def test_one_bad_entry_of_any_kind_does_not_stop_start_up(llama_spec, peft_files, tmp_path):
    good = AdapterRegistry(llama_spec, store=tmp_path)
    good.put("good", peft_files())
    bad = {
        "one-d": {"prompt_embeddings": torch.zeros(8)},
        "zero-size": {"prompt_embeddings": torch.zeros(0, 64)},
    }
    config = peft_files()["adapter_config.json"]
    for name, tensors in bad.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_config.json").write_bytes(config)
        (tmp_path / name / "adapter_model.safetensors").write_bytes(save_st(tensors))
    (tmp_path / "not-json").mkdir()
    (tmp_path / "not-json" / "meta.json").write_bytes(b"\xff\xfe")
    fresh = AdapterRegistry(llama_spec, store=tmp_path)
    skipped = dict(fresh.load_store())
    assert sorted(skipped) == ["not-json", "one-d", "zero-size"]
    assert "prompt_embeddings" in skipped["one-d"] and "meta.json" in skipped["not-json"]
    assert [r.id for r in fresh.list()] == ["good"] and len(fresh) == 1
    assert fresh.get("one-d") is None


def test_len_counts_what_other_replicas_wrote(llama_spec, peft_files, tmp_path):
    a = AdapterRegistry(llama_spec, store=tmp_path)
    b = AdapterRegistry(llama_spec, store=tmp_path)
    a.put("one", peft_files())
    a.put("two", peft_files(seed=1))
    assert len(b) == 2  # without b ever looking them up
    a.delete("one")
    assert len(b) == 1 and len(a) == 1


def test_lookups_do_not_wait_for_an_upload(llama_spec, peft_files, tmp_path):
    registry = AdapterRegistry(llama_spec, store=tmp_path)
    known, _ = registry.put("known", peft_files())
    outcome: dict[str, object] = {}

    def upload() -> None:
        outcome["put"] = registry.put("new", peft_files(seed=4))

    with registry.store.locked():  # another replica holds the store: the upload stages, validates, then waits
        writer = threading.Thread(target=upload)
        writer.start()
        deadline = time.monotonic() + 10
        while not any(p.startswith(".tmp-") for p in os.listdir(tmp_path)) and time.monotonic() < deadline:
            time.sleep(0.001)
        time.sleep(0.05)
        assert writer.is_alive()
        results: list[object] = []
        reader = threading.Thread(target=lambda: results.extend(
            [registry.get("known"), registry.get("unknown"), registry.get("new"), "unknown" in registry]))
        reader.start()
        reader.join(timeout=2)
        assert not reader.is_alive(), "a lookup waited for the upload"
        assert results == [known, None, None, False]
    writer.join(timeout=30)
    record, created = outcome["put"]  # type: ignore[misc]
    assert created and registry.get("new") is record


def test_store_backed_lookups_stay_cheap_at_scale(peft_files, tmp_path, monkeypatch):
    n = 3000
    spec = ModelSpec("llama", hidden_size=8, num_layers=1, num_attention_heads=2, num_kv_heads=1, head_dim=4,
                     vocab_size=10)
    config = json.loads(peft_files()["adapter_config.json"])
    config.update(token_dim=8, num_virtual_tokens=2)
    config_bytes = json.dumps(config).encode()
    weights = save_st({"prompt_embeddings": torch.randn(2, 8)})
    for i in range(n):
        path = tmp_path / f"a{i}"
        path.mkdir()
        (path / "adapter_config.json").write_bytes(config_bytes)
        (path / "adapter_model.safetensors").write_bytes(weights)
        (path / "meta.json").write_text('{"version": 1}')
    registry = AdapterRegistry(spec, store=tmp_path)
    assert registry.load_store() == [] and len(registry) == n

    def no_scan(*args, **kwargs):
        raise AssertionError("a lookup scanned the store directory")

    monkeypatch.setattr(os, "scandir", no_scan)
    monkeypatch.setattr(os, "listdir", no_scan)
    monkeypatch.setattr("pathlib.Path.glob", no_scan)
    monkeypatch.setattr("pathlib.Path.iterdir", no_scan)
    ids = [f"a{i}" for i in range(0, n, 3)]
    missing = [f"b{i}" for i in range(0, n, 3)]
    start = time.perf_counter()
    for adapter_id in ids:
        assert registry.get(adapter_id).id == adapter_id
    known = (time.perf_counter() - start) / len(ids)
    start = time.perf_counter()
    for adapter_id in missing:
        assert registry.get(adapter_id) is None
    unknown = (time.perf_counter() - start) / len(missing)
    assert known < 1e-3 and unknown < 1e-3, (known, unknown)
