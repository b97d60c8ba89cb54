"""AdapterRegistry and its store: versions, atomic writes, archives (unpacked at the upload edge), replicas sharing
a store, scale."""

from __future__ import annotations

import io
import json
import os
import tarfile
import time
import tracemalloc
import zipfile

import pytest
import torch
from safetensors.torch import save as save_st

from prompt_server.adapters.errors import AdapterError, AdapterTooLarge
from prompt_server.adapters.registry import AdapterRegistry
from prompt_server.adapters.types import ModelSpec
from prompt_server.api.upload import adapter_files

LIMIT = 64 * 1024 * 1024  # the default max_upload_bytes


def unpacked(archive: bytes, limit: int = LIMIT) -> dict[str, bytes]:
    """What the upload edge hands the registry for an `archive` part."""
    return adapter_files({"archive": archive}, limit)


def tree(root) -> dict[str, bytes]:
    """Every file under root with its content (hidden lock file excluded): a store's full observable state."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in filenames:
            if name == ".lock":
                continue
            path = os.path.join(dirpath, name)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, root)] = fh.read()
    return out


@pytest.fixture
def registry(llama_spec, tmp_path):
    return AdapterRegistry(llama_spec, device="cpu", dtype=torch.float32, store=tmp_path / "store")


def test_put_creates_then_replace_bumps_version(registry, peft_files, tmp_path):
    first, created = registry.put("persona", peft_files(seed=1))
    assert created and first.version == 1 and registry.get("persona") is first
    kept = first.virtual_tokens.clone()
    second, created = registry.put("persona", peft_files(seed=2))
    assert not created and second.version == 2 and registry.get("persona") is second
    assert first.version == 1 and torch.equal(first.virtual_tokens, kept)  # the old object is untouched
    assert not torch.equal(second.virtual_tokens, kept)
    meta = json.loads((tmp_path / "store" / "persona" / "meta.json").read_text())
    assert meta["version"] == 2 and meta["sha256"] == second.sha256 and meta["labels"] is None
    assert sorted(os.listdir(tmp_path / "store")) == [".lock", "persona"]  # no staging left behind
    assert len(registry) == 1 and [r.id for r in registry.list()] == ["persona"]


def test_replace_with_another_kind(registry, peft_files):
    registry.put("x", peft_files("prompt_tuning"))
    record, _ = registry.put("x", peft_files("prefix"))
    assert record.is_prefix and record.virtual_tokens is None and record.peft_type == "PREFIX_TUNING"


@pytest.mark.parametrize("existing", [False, True])
def test_failed_put_leaves_store_and_registry_identical(registry, peft_files, tmp_path, existing):
    if existing:
        registry.put("x", peft_files(seed=1))
    before_tree, before_record = tree(tmp_path / "store"), registry.get("x")
    bad = {**peft_files(), "adapter_config.json": json.dumps({"peft_type": "LORA"}).encode()}
    with pytest.raises(AdapterError, match="not a soft-prompt adapter"):
        registry.put("x", bad)
    bad_weights = {**peft_files(), "adapter_model.safetensors": save_st({"prompt_embeddings": torch.zeros(4, 7)})}
    with pytest.raises(AdapterError, match=r"prompt_embeddings has shape \[4, 7\]"):
        registry.put("x", bad_weights)
    assert tree(tmp_path / "store") == before_tree
    assert sorted(p for p in os.listdir(tmp_path / "store") if p.startswith(".tmp")) == []
    assert registry.get("x") is before_record and len(registry) == int(existing)


def test_delete(registry, peft_files, tmp_path):
    registry.put("gone", peft_files())
    assert registry.delete("gone") is True
    assert registry.get("gone") is None and not (tmp_path / "store" / "gone").exists() and len(registry) == 0
    assert registry.delete("gone") is False
    with pytest.raises(AdapterError, match="is invalid"):
        registry.delete("../store")


def test_labels_persist_and_reload(llama_spec, peft_files, tmp_path):
    registry = AdapterRegistry(llama_spec, store=tmp_path)
    registry.put("sent", peft_files(task_type="SEQ_CLS"), labels=["negative", "positive"])
    fresh = AdapterRegistry(llama_spec, store=tmp_path)
    assert fresh.load_store() == []
    record = fresh.get("sent")
    assert record.labels == ("negative", "positive") and record.classifier is not None and record.version == 1


def _zip(files, folder=""):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in files.items():
            zf.writestr(folder + name, data)
    return buf.getvalue()


def _tar(files, mode="w", folder="", extra=None):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(folder + name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        if extra is not None:
            tf.addfile(extra)
    return buf.getvalue()


@pytest.mark.parametrize("kind", ["zip", "zip-folder", "tar", "tar.gz", "tar.gz-folder"])
def test_archive_upload(registry, peft_files, kind):
    files = peft_files("p_tuning_lstm")
    archive = {
        "zip": lambda: _zip(files),
        "zip-folder": lambda: _zip(files, "my-adapter/"),
        "tar": lambda: _tar(files),
        "tar.gz": lambda: _tar(files, "w:gz"),
        "tar.gz-folder": lambda: _tar(files, "w:gz", "checkpoint-100/"),
    }[kind]()
    record, created = registry.put("arch", unpacked(archive))
    direct = AdapterRegistry(registry.spec).put("arch", files)[0]
    assert created and record.peft_type == "P_TUNING"
    torch.testing.assert_close(record.virtual_tokens, direct.virtual_tokens, atol=0, rtol=0)


@pytest.mark.parametrize("name", ["../adapter_config.json", "/abs/adapter_config.json", "a/../../x"])
def test_archive_path_traversal_rejected(registry, peft_files, name, tmp_path):
    files = peft_files()
    with pytest.raises(AdapterError, match="has an unsafe path"):
        registry.put("t", unpacked(_zip({name: files["adapter_config.json"]})))
    with pytest.raises(AdapterError, match="has an unsafe path"):
        registry.put("t", unpacked(_tar({name: files["adapter_config.json"]})))
    assert not (tmp_path / "adapter_config.json").exists() and registry.get("t") is None


def test_archive_links_and_nesting_rejected(registry, peft_files):
    link = tarfile.TarInfo("adapter_model.safetensors")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    with pytest.raises(AdapterError, match="is a link or device"):
        registry.put("t", unpacked(_tar({"adapter_config.json": b"{}"}, extra=link)))
    with pytest.raises(AdapterError, match="at top level or in one folder"):
        registry.put("t", unpacked(_zip(peft_files(), "a/b/")))
    with pytest.raises(AdapterError, match="not a readable .zip, .tar or .tar.gz"):
        registry.put("t", unpacked(b"plain bytes"))
    with pytest.raises(AdapterError, match="an archive upload takes no other files"):
        registry.put("t", adapter_files({"archive": _zip(peft_files()), "adapter_config.json": b"{}"}, LIMIT))


def test_archive_oversized_member_rejected(llama_spec, peft_files):
    registry = AdapterRegistry(llama_spec)
    files = {**peft_files(), "adapter_model.safetensors": b"\0" * 200_000}
    archive = _tar(files, "w:gz")  # compresses to far below the limit, unpacks far above it
    assert len(archive) < 50_000
    with pytest.raises(AdapterTooLarge, match="archive unpacks to more than max_upload_bytes 50000"):
        registry.put("bomb", unpacked(archive, 50_000))


def test_two_registries_on_one_store_see_each_other(llama_spec, peft_files, tmp_path):
    a = AdapterRegistry(llama_spec, store=tmp_path)
    b = AdapterRegistry(llama_spec, store=tmp_path)
    assert b.get("shared") is None
    a.put("shared", peft_files(seed=1))
    seen = b.get("shared")
    assert seen is not None and seen.version == 1 and b.get("shared") is seen  # cached until it changes
    record, created = b.put("shared", peft_files(seed=2))
    assert not created and record.version == 2
    assert a.get("shared").version == 2
    torch.testing.assert_close(a.get("shared").virtual_tokens, record.virtual_tokens)
    assert [r.id for r in a.list()] == ["shared"]
    b.delete("shared")
    assert a.get("shared") is None and a.list() == [] and len(a) == 0


def test_replica_keeps_old_version_when_store_copy_is_broken(llama_spec, peft_files, tmp_path):
    a = AdapterRegistry(llama_spec, store=tmp_path)
    record, _ = a.put("x", peft_files())
    meta = tmp_path / "x" / "meta.json"
    (tmp_path / "x" / "adapter_config.json").write_text("{broken")
    meta.write_text(meta.read_text().replace('"version": 1', '"version": 2'))
    assert a.get("x") is record and a.get("x") is record


def test_load_store_skips_bad_adapters(llama_spec, peft_files, tmp_path):
    good = AdapterRegistry(llama_spec, store=tmp_path)
    good.put("good", peft_files())
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "adapter_config.json").write_text("{oops")
    (tmp_path / "bad" / "adapter_model.safetensors").write_bytes(b"")
    (tmp_path / ".tmp-leftover").mkdir()
    (tmp_path / ".tmp-recent").mkdir()  # another replica may be staging into it right now
    os.utime(tmp_path / ".tmp-leftover", (time.time() - 7200, time.time() - 7200))
    fresh = AdapterRegistry(llama_spec, store=tmp_path)
    skipped = fresh.load_store()
    assert not (tmp_path / ".tmp-leftover").exists() and (tmp_path / ".tmp-recent").exists()
    assert [i for i, _ in skipped] == ["bad"] and "not valid JSON" in skipped[0][1]
    assert [r.id for r in fresh.list()] == ["good"]


def test_plain_peft_directory_in_store(llama_spec, tiny_llama_dir, tmp_path):
    from tests.tiny import make_peft, save_peft

    save_peft(make_peft(tiny_llama_dir, "prefix"), tmp_path / "from-peft")  # README.md and no meta.json
    registry = AdapterRegistry(llama_spec, store=tmp_path)
    assert registry.load_store() == []
    assert registry.get("from-peft").version == 1 and registry.get("from-peft").is_prefix


def test_get_rejects_path_like_ids(registry):
    assert registry.get("../etc") is None and registry.get("") is None


def test_ten_thousand_adapters(peft_files):
    spec = ModelSpec("llama", hidden_size=8, num_layers=1, num_attention_heads=2, num_kv_heads=1, head_dim=4,
                     vocab_size=10)
    config = json.loads(peft_files()["adapter_config.json"])
    config.update(token_dim=8, num_virtual_tokens=2)
    files = {"adapter_config.json": json.dumps(config).encode(),
             "adapter_model.safetensors": save_st({"prompt_embeddings": torch.randn(2, 8)})}
    registry = AdapterRegistry(spec)
    tracemalloc.start()
    for i in range(10_000):
        registry.put(f"a{i}", files)
    python_bytes = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert len(registry) == 10_000
    assert python_bytes / 10_000 < 4_096  # bookkeeping per adapter stays small next to real tensors
    start = time.perf_counter()
    for i in range(0, 10_000, 7):
        assert registry.get(f"a{i}").id == f"a{i}"
    per_lookup = (time.perf_counter() - start) / len(range(0, 10_000, 7))
    assert per_lookup < 20e-6
    assert registry.get("a9999").virtual_tokens.shape == (2, 8)


def test_readers_always_see_a_whole_version(llama_spec, peft_files, tmp_path):
    import threading

    writer = AdapterRegistry(llama_spec, store=tmp_path)
    reader = AdapterRegistry(llama_spec, store=tmp_path)
    versions = [peft_files(seed=s) for s in (1, 2)]
    expected = {r.sha256: r for r in (AdapterRegistry(llama_spec).put("x", f)[0] for f in versions)}
    writer.put("x", versions[0])
    stop, seen, errors = threading.Event(), set(), []

    def read() -> None:
        while not stop.is_set():
            record = reader.get("x")
            if record is None:
                errors.append("adapter vanished during a replace")
                continue
            seen.add(record.version)
            if not torch.equal(record.virtual_tokens, expected[record.sha256].virtual_tokens):
                errors.append(f"version {record.version} mixes files")

    threads = [threading.Thread(target=read) for _ in range(2)]
    for t in threads:
        t.start()
    for i in range(20):
        writer.put("x", versions[i % 2])
    stop.set()
    for t in threads:
        t.join()
    assert errors == [] and len(seen) > 1 and reader.get("x").version == 21


def test_every_version_has_its_own_signature(registry, peft_files):
    signatures = set()
    for i in range(6):
        registry.put("x", peft_files(seed=i % 2))
        signatures.add(registry.store.signature("x"))
    assert len(signatures) == 6


def test_a_write_from_another_process_is_seen(llama_spec, peft_files, tmp_path):
    import dataclasses
    import subprocess
    import sys

    registry = AdapterRegistry(llama_spec, store=tmp_path / "store")
    first, _ = registry.put("shared", peft_files(seed=1))
    upload = tmp_path / "upload"
    upload.mkdir()
    for name, data in peft_files(seed=2).items():
        (upload / name).write_bytes(data)
    script = (
        "import json, sys\n"
        "from pathlib import Path\n"
        "from prompt_server.adapters.registry import AdapterRegistry\n"
        "from prompt_server.adapters.types import ModelSpec\n"
        "spec = ModelSpec(**json.loads(sys.argv[1]))\n"
        "other = AdapterRegistry(spec, store=Path(sys.argv[2]))\n"
        "files = {p.name: p.read_bytes() for p in Path(sys.argv[3]).iterdir()}\n"
        "other.put('shared', files, labels=['a', 'b'])\n"
        "other.put('added', files)\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    subprocess.run([sys.executable, "-c", script, json.dumps(dataclasses.asdict(llama_spec)),
                    str(tmp_path / "store"), str(upload)], check=True, cwd=root, timeout=120)
    replaced = registry.get("shared")
    assert replaced.version == 2 and replaced.labels == ("a", "b") and first.version == 1
    assert not torch.equal(replaced.virtual_tokens, first.virtual_tokens)
    assert registry.get("added").version == 1 and len(registry.list()) == 2
