"""Adapter routes in process: upload (files, .bin, archive), generate with it at once (PEFT as the oracle),
replace, delete, list, classify; archives unpacked and sizes held at the edge (and in the CLI client), a rejected
upload leaving the store untouched."""

from __future__ import annotations

import io
import json
import tarfile
import zipfile

import pytest

from prompt_server.client import AdminClient, UploadRefused, upload_files
from tests.api.oracle import peft_greedy, saved_peft, upload_parts
from tests.tiny import VARIANTS

PROMPT = "Once upon a time"
N = 12


def _generate(client, adapter_id, prompt=PROMPT, n=N):
    body = {"inputs": prompt, "parameters": {"adapter_id": adapter_id, "max_new_tokens": n, "details": True}}
    r = client.post("/generate", json=body)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.parametrize("variant", VARIANTS)
def test_uploaded_adapter_generates_like_peft(client, tiny_llama_dir, tmp_path, variant):
    peft, adapter_dir = saved_peft(tiny_llama_dir, variant, tmp_path / variant, seed=5)
    r = client.put(f"/adapters/{variant}", files=upload_parts(adapter_dir))
    assert r.status_code == 201, r.text
    record = r.json()
    assert record["id"] == variant and record["version"] == 1 and record["num_virtual_tokens"] == 4
    assert record["peft_type"] == ("PREFIX_TUNING" if variant.startswith("prefix") else
                                   "PROMPT_TUNING" if variant == "prompt_tuning" else "P_TUNING")
    got = [t["id"] for t in _generate(client, variant)["details"]["tokens"]]
    assert got == peft_greedy(peft, tiny_llama_dir, PROMPT, N)
    base = [t["id"] for t in _generate(client, None)["details"]["tokens"]]
    assert got != base  # the adapter changes the output, so the equality above means something


def test_bin_upload_and_openai_model_name(client, tiny_llama_dir, tmp_path):
    peft, adapter_dir = saved_peft(tiny_llama_dir, "prompt_tuning", tmp_path / "b", seed=9, fmt="bin")
    assert client.put("/adapters/as-bin", files=upload_parts(adapter_dir)).status_code == 201
    expected = peft_greedy(peft, tiny_llama_dir, PROMPT, N)
    r = client.post("/v1/completions", json={"model": "as-bin", "prompt": PROMPT, "max_tokens": N, "temperature": 0})
    assert r.status_code == 200, r.text
    tokenizer = client.app.state.service.engine.tokenizer
    assert r.json()["choices"][0]["text"] == tokenizer.decode(expected, skip_special_tokens=True)
    assert "as-bin" in [m["id"] for m in client.get("/v1/models").json()["data"]]


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_archive_upload(client, tiny_llama_dir, tmp_path, kind):
    peft, adapter_dir = saved_peft(tiny_llama_dir, "p_tuning_mlp", tmp_path / "arch", seed=2)
    buf = io.BytesIO()
    if kind == "zip":
        with zipfile.ZipFile(buf, "w") as zf:
            for name, (_, data) in upload_parts(adapter_dir).items():
                zf.writestr(name, data)
    else:
        with tarfile.open(fileobj=buf, mode="w:gz") as tf:
            for name, (_, data) in upload_parts(adapter_dir).items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    adapter_id = f"archived-{kind.replace('.', '-')}"
    r = client.put(f"/adapters/{adapter_id}", files={"archive": (f"a.{kind}", buf.getvalue())})
    assert r.status_code == 201, r.text
    got = [t["id"] for t in _generate(client, adapter_id)["details"]["tokens"]]
    assert got == peft_greedy(peft, tiny_llama_dir, PROMPT, N)


def test_replace_bumps_version_and_delete_removes(client, tiny_llama_dir, tmp_path):
    _, dir1 = saved_peft(tiny_llama_dir, "prefix", tmp_path / "v1", seed=1)
    peft2, dir2 = saved_peft(tiny_llama_dir, "prefix", tmp_path / "v2", seed=2)
    assert client.put("/adapters/swap", files=upload_parts(dir1)).status_code == 201
    first = _generate(client, "swap")
    assert first["details"]["adapter_version"] == 1
    r = client.put("/adapters/swap", files=upload_parts(dir2))
    assert r.status_code == 200 and r.json()["version"] == 2
    second = _generate(client, "swap")
    assert second["details"]["adapter_version"] == 2
    assert [t["id"] for t in second["details"]["tokens"]] == peft_greedy(peft2, tiny_llama_dir, PROMPT, N)
    assert client.get("/adapters/swap").json()["version"] == 2
    assert client.delete("/adapters/swap").status_code == 204
    assert client.get("/adapters/swap").status_code == 404
    r = client.post("/generate", json={"inputs": PROMPT, "parameters": {"adapter_id": "swap"}})
    assert r.status_code == 404 and r.json()["error_type"] == "not_found"


def test_list_and_show(client, tiny_llama_dir, tmp_path):
    _, adapter_dir = saved_peft(tiny_llama_dir, "prompt_tuning", tmp_path / "l", seed=4)
    client.put("/adapters/listed", files=upload_parts(adapter_dir), data={"labels": json.dumps(["no", "yes"])})
    listed = {a["id"]: a for a in client.get("/adapters").json()["adapters"]}
    shown = client.get("/adapters/listed").json()
    assert listed["listed"] == shown
    assert shown["labels"] == ["no", "yes"]
    assert len(shown["sha256"]) == 64 and shown["size_bytes"] > 0 and shown["created_at"] > 0


def test_classify_with_verbalizers_and_with_a_head(client, tiny_llama_dir, tmp_path):
    r = client.post("/classify", json={"inputs": ["the film was good", "the food was bad"],
                                       "labels": ["good", "bad"]})
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert len(preds) == 2
    for p in preds:
        assert set(p["scores"]) == {"good", "bad"}
        assert abs(sum(p["scores"].values()) - 1) < 1e-4
        assert p["label"] == max(p["scores"], key=p["scores"].get) and p["score"] == p["scores"][p["label"]]
    _, head_dir = saved_peft(tiny_llama_dir, "prompt_tuning", tmp_path / "cls", seed=3, task_type="SEQ_CLS")
    r = client.put("/adapters/sentiment", files=upload_parts(head_dir), data={"labels": '["neg", "pos"]'})
    assert r.status_code == 201, r.text
    assert r.json()["has_classifier"] and r.json()["task_type"] == "SEQ_CLS"
    r = client.post("/classify", json={"inputs": "I loved it", "adapter_id": "sentiment"})
    assert r.status_code == 200, r.text
    (pred,) = r.json()["predictions"]
    assert set(pred["scores"]) == {"neg", "pos"}


def _store_tree(root) -> dict[str, bytes]:
    """Every entry under the store, hidden ones included (the lock file aside), with file contents."""
    out = {}
    for path in sorted(root.rglob("*")):
        if path.name != ".lock":
            out[str(path.relative_to(root))] = path.read_bytes() if path.is_file() else b""
    return out


def _zip_of(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


def test_an_archive_is_unpacked_at_the_edge(client, tiny_llama_dir, tmp_path, monkeypatch):
    _, adapter_dir = saved_peft(tiny_llama_dir, "prompt_tuning", tmp_path / "edge", seed=6)
    registry = client.app.state.service.registry
    handed: list[set[str]] = []
    put = registry.put
    monkeypatch.setattr(registry, "put", lambda i, files, labels: handed.append(set(files)) or put(i, files, labels))
    archive = _zip_of({f"ckpt/{p.name}": p.read_bytes() for p in adapter_dir.iterdir()})  # README.md included
    r = client.put("/adapters/unpacked-at-edge", files={"archive": ("a.zip", archive)})
    assert r.status_code == 201, r.text
    assert handed == [{"adapter_config.json", "adapter_model.safetensors", "README.md"}]  # files, never an archive


def test_rejected_uploads_leave_the_store_untouched(serve, tiny_llama_dir, tmp_path):
    _, adapter_dir = saved_peft(tiny_llama_dir, "prompt_tuning", tmp_path / "rej", seed=7)
    parts = upload_parts(adapter_dir)
    files = {name: data for name, (_, data) in parts.items()}
    encrypted = bytearray(_zip_of({"adapter_config.json": b"{}"}))
    for sig, at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):  # set the encrypted flag in both headers
        encrypted[encrypted.index(sig) + at] |= 1
    bomb = io.BytesIO()
    with tarfile.open(fileobj=bomb, mode="w:gz") as tf:
        info = tarfile.TarInfo("adapter_model.safetensors")
        info.size = 300_000
        tf.addfile(info, io.BytesIO(b"\0" * info.size))
    lora = {**files, "adapter_config.json": json.dumps({"peft_type": "LORA"}).encode()}
    cases = [
        ({"archive": ("e.zip", bytes(encrypted))}, 400, "is encrypted"),
        ({"archive": ("b.tar.gz", bomb.getvalue())}, 413, "archive unpacks to more than max_upload_bytes 200000"),
        ({"archive": ("s.zip", _zip_of({"../adapter_config.json": b"{}"}))}, 400, "has an unsafe path"),
        ({"archive": ("a.zip", _zip_of(files)), **parts}, 400, "an archive upload takes no other files"),
        ({"archive": ("l.zip", _zip_of(lora))}, 400, "not a soft-prompt adapter"),
        ({name: (name, data) for name, data in lora.items()}, 400, "not a soft-prompt adapter"),
    ]
    with serve(max_upload_bytes=200_000) as c:
        store = c.app.state.service.settings.adapters
        assert c.put("/adapters/kept", files=parts).status_code == 201
        before = _store_tree(store)
        for upload, status, message in cases:
            for adapter_id in ("kept", "new"):
                r = c.put(f"/adapters/{adapter_id}", files=upload)
                assert r.status_code == status, (message, r.text)
                assert message in r.json()["error"]
                assert r.json()["error_type"] == ("too_large" if status == 413 else "bad_request")
        assert _store_tree(store) == before  # no staging directory, no rewritten meta.json, nothing left behind
        assert c.get("/adapters/kept").json()["version"] == 1 and c.get("/adapters/new").status_code == 404


def _admin(client) -> AdminClient:
    """An AdminClient that talks to the in-process app."""
    admin = AdminClient("http://testserver")
    admin.http.close()
    admin.http = client
    return admin


def test_cli_client_unpacks_and_checks_in_one_place(client, tiny_llama_dir, tmp_path):
    peft, adapter_dir = saved_peft(tiny_llama_dir, "p_tuning_mlp", tmp_path / "cli", seed=8)
    assert set(upload_files(adapter_dir)) == {"adapter_config.json", "adapter_model.safetensors"}
    archive = tmp_path / "cli.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(adapter_dir, arcname="checkpoint-1")  # README.md included: PEFT writes one
    parts = upload_files(archive)
    assert set(parts) == {"adapter_config.json", "adapter_model.safetensors"}  # unpacked here, model card dropped
    assert parts["adapter_model.safetensors"][1] == (adapter_dir / "adapter_model.safetensors").read_bytes()

    admin = _admin(client)
    assert admin.max_upload_bytes() == client.app.state.service.settings.max_upload_bytes
    record, created = admin.push("from-archive", archive)
    assert created and record["peft_type"] == "P_TUNING"
    got = [t["id"] for t in _generate(client, "from-archive")["details"]["tokens"]]
    assert got == peft_greedy(peft, tiny_llama_dir, PROMPT, N)

    size = sum(len(d) for _, d in parts.values())
    hostile = tmp_path / "slip.zip"
    hostile.write_bytes(_zip_of({"../adapter_config.json": b"{}"}))
    extra = tmp_path / "extra.zip"
    extra.write_bytes(_zip_of({**{n: d for n, (_, d) in parts.items()}, "optimizer.pt": b"x"}))
    for path, limit, status, message in [
        (adapter_dir, size - 1, 413, f"the files' size ({size} bytes) is over max_upload_bytes={size - 1}"),
        (archive, size - 1, 413, f"archive unpacks to more than max_upload_bytes {size - 1}"),
        (hostile, None, 400, "has an unsafe path"),
        (extra, None, 400, "unknown file(s) optimizer.pt in extra.zip"),
    ]:
        with pytest.raises(UploadRefused) as refused:
            admin.push("refused", path, max_bytes=limit)
        assert refused.value.status == status and message in str(refused.value)
        assert str(refused.value).startswith("upload not sent: ")
    assert client.get("/adapters/refused").status_code == 404
    with pytest.raises(FileNotFoundError, match="neither a PEFT adapter directory nor an archive"):
        admin.push("refused", tmp_path / "missing")
