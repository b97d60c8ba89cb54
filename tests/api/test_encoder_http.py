"""An encoder classifier served over HTTP: upload, /classify against PEFT, generation routes refused with 400."""

from __future__ import annotations

import json

import pytest
import torch
from fastapi.testclient import TestClient
from transformers import AutoTokenizer

from prompt_server.config import Settings
from prompt_server.main import create_app
from tests.api.oracle import upload_parts
from tests.tiny import make_peft, save_peft, save_tiny_encoder


@pytest.fixture(scope="module")
def roberta(tmp_path_factory):
    model_dir = save_tiny_encoder("roberta", tmp_path_factory.mktemp("roberta") / "model")
    # as real BERT/RoBERTa tokenizers: no chat template
    (model_dir / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (model_dir / "tokenizer_config.json").write_text(json.dumps(config))
    settings = Settings(model=str(model_dir), adapters=tmp_path_factory.mktemp("store"))
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        yield client, model_dir


def test_info_and_models_name_the_family(roberta):
    client, _ = roberta
    info = client.get("/info").json()
    assert info["family"] == "encoder" and info["tasks"] == ["SEQ_CLS"] and info["forward_path"] == "encoder"
    assert info["max_position"] == 128 - (0 + 1)  # RoBERTa positions start after padding_idx (0 here)
    base = client.get("/v1/models").json()["data"][0]
    assert base["family"] == "encoder" and base["tasks"] == ["SEQ_CLS"]


def test_uploaded_prefix_adapter_classifies_like_peft(roberta, tmp_path):
    client, model_dir = roberta
    pm = make_peft(model_dir, "prefix_projection", task_type="SEQ_CLS", num_labels=3, seed=5)
    r = client.put("/adapters/topics", files=upload_parts(save_peft(pm, tmp_path / "a")),
                   data={"labels": '["sport", "food", "music"]'})
    assert r.status_code == 201, r.text
    assert r.json()["has_classifier"] and r.json()["task_type"] == "SEQ_CLS"
    texts = ["the food was bad", "one two three"]
    r = client.post("/classify", json={"inputs": texts, "adapter_id": "topics"})
    assert r.status_code == 200, r.text
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    for text, pred in zip(texts, r.json()["predictions"]):
        ids = tokenizer(text, return_tensors="pt").input_ids
        with torch.inference_mode():
            expected = pm(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0].softmax(-1)
        got = torch.tensor([pred["scores"][k] for k in ("sport", "food", "music")])
        assert torch.allclose(got, expected, atol=1e-4)


def test_classify_without_an_adapter_uses_the_models_own_head_and_labels(roberta):
    client, _ = roberta
    r = client.post("/classify", json={"inputs": "I loved it"})
    assert r.status_code == 200, r.text
    (pred,) = r.json()["predictions"]
    assert set(pred["scores"]) == {"negative", "positive"}
    r = client.post("/classify", json={"inputs": "I loved it", "labels": ["a", "b", "c"]})
    assert r.status_code == 422 and "the model's classifier head has 2 outputs, got 3 labels" in r.text


@pytest.mark.parametrize("route,body", [
    ("/generate", {"inputs": "hello"}),
    ("/generate_stream", {"inputs": "hello", "parameters": {"max_new_tokens": 100000}}),
    ("/v1/completions", {"model": "model", "prompt": "hello", "max_tokens": 100000}),
    ("/v1/chat/completions", {"model": "model", "messages": [{"role": "user", "content": "hi"}]}),
])
def test_generation_routes_answer_400_naming_the_family(roberta, route, body):
    client, _ = roberta
    r = client.post(route, json=body)
    assert r.status_code == 400, r.text
    assert "encoder-only classifier (roberta)" in r.text and "/classify" in r.text


def test_a_causal_adapter_upload_is_refused_and_nothing_stored(roberta, tiny_llama_dir, tmp_path):
    client, _ = roberta
    before = client.get("/adapters").json()
    r = client.put("/adapters/causal", files=upload_parts(save_peft(make_peft(tiny_llama_dir, "prefix"),
                                                                     tmp_path / "c")))
    assert r.status_code in (400, 422), r.text
    assert "task_type CAUSAL_LM cannot be served on roberta" in r.text
    assert client.get("/adapters").json() == before
