"""Adapter routes in process: upload (files, .bin, archive), generate with it at once (PEFT as the oracle),
replace, delete, list, classify."""

from __future__ import annotations

import io
import json
import tarfile
import zipfile

import pytest

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
