"""An encoder-decoder LM served over HTTP: uploads, every generation route and /classify against PEFT's generate."""

from __future__ import annotations

import json

import pytest
import torch
from fastapi.testclient import TestClient
from transformers import AutoTokenizer

from prompt_server.config import Settings
from prompt_server.main import create_app
from tests.api.oracle import upload_parts
from tests.tiny import make_peft, save_peft, save_tiny_seq2seq

PROMPT = "Once upon a time there was a little cat"


@pytest.fixture(scope="module")
def t5(tmp_path_factory):
    """A T5 server with a prefix adapter (submodules 2) and a P-tuning adapter (submodules 1) uploaded."""
    tmp = tmp_path_factory.mktemp("t5")
    model_dir = save_tiny_seq2seq("t5", tmp / "model")
    settings = Settings(model=str(model_dir), adapters=tmp / "store")
    peft = {
        "prefix": make_peft(model_dir, "prefix_projection", task_type="SEQ_2_SEQ_LM", seed=3, num_virtual_tokens=5),
        "ptune": make_peft(model_dir, "p_tuning_lstm", task_type="SEQ_2_SEQ_LM", seed=4, num_virtual_tokens=6,
                           num_transformer_submodules=1),
    }
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        for name, pm in peft.items():
            r = client.put(f"/adapters/{name}", files=upload_parts(save_peft(pm, tmp / name)))
            assert r.status_code == 201, r.text
            assert r.json()["task_type"] == "SEQ_2_SEQ_LM"
        yield client, model_dir, peft


def oracle(model, tokenizer, prompt: str, n: int) -> list[int]:
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)
    return out[0, 1:].tolist()  # after the decoder start token


def test_info_and_models_name_the_family(t5):
    client, _, _ = t5
    info = client.get("/info").json()
    assert info["family"] == "seq2seq" and info["tasks"] == ["SEQ_2_SEQ_LM"] and info["forward_path"] == "seq2seq"
    base = client.get("/v1/models").json()["data"][0]
    assert base["family"] == "seq2seq" and base["tasks"] == ["SEQ_2_SEQ_LM"]


@pytest.mark.parametrize("adapter", ["prefix", "ptune", None])
def test_generate_and_stream_give_peft_tokens(t5, adapter):
    client, model_dir, peft = t5
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = peft[adapter] if adapter else None
    if model is None:
        from transformers import AutoModelForSeq2SeqLM

        model = AutoModelForSeq2SeqLM.from_pretrained(model_dir).eval()
    expected = oracle(model, tokenizer, PROMPT, 10)
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 10, "details": True, "adapter_id": adapter}}
    r = client.post("/generate", json=body)
    assert r.status_code == 200, r.text
    got = [t["id"] for t in r.json()["details"]["tokens"]]
    assert got == expected[: len(got)] and len(got) == len(expected)
    assert r.json()["generated_text"] == tokenizer.decode(got, skip_special_tokens=True)
    with client.stream("POST", "/generate_stream", json=body) as s:
        events = [json.loads(line[5:]) for line in s.iter_lines() if line.startswith("data:")]
    assert [e["token"]["id"] for e in events] == got


def test_openai_completions_use_the_adapter_as_model(t5):
    client, model_dir, peft = t5
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    expected = oracle(peft["prefix"], tokenizer, PROMPT, 6)
    r = client.post("/v1/completions", json={"model": "prefix", "prompt": PROMPT, "max_tokens": 6,
                                             "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == tokenizer.decode(expected, skip_special_tokens=True)
    assert r.json()["usage"]["completion_tokens"] == len(expected)


def test_classify_scores_labels_with_the_decoder(t5):
    client, model_dir, peft = t5
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    labels = ["yes", "no", "good"]
    r = client.post("/classify", json={"inputs": [PROMPT], "adapter_id": "ptune", "labels": labels})
    assert r.status_code == 200, r.text
    pm = peft["ptune"]
    start = pm.base_model.config.decoder_start_token_id
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    totals = []
    for label in labels:
        lab = tokenizer(" " + label, add_special_tokens=False).input_ids
        dec = torch.tensor([[start] + lab[:-1]])
        with torch.inference_mode():
            logits = pm(input_ids=ids, attention_mask=torch.ones_like(ids), decoder_input_ids=dec).logits[0]
        totals.append(logits.log_softmax(-1).gather(-1, torch.tensor(lab)[:, None]).sum())
    expected = torch.stack(totals).softmax(-1)
    got = torch.tensor([r.json()["predictions"][0]["scores"][k] for k in labels])
    assert torch.allclose(got, expected, atol=1e-4)


def test_refusals_name_the_reason(t5, tmp_path):
    client, model_dir, _ = t5
    r = client.post("/generate", json={"inputs": PROMPT, "parameters": {"decoder_input_details": True}})
    assert r.status_code == 422 and "encoder-decoder" in r.json()["error"]
    pm = make_peft(model_dir, "prefix", task_type="SEQ_2_SEQ_LM", num_transformer_submodules=1)
    r = client.put("/adapters/bad", files=upload_parts(save_peft(pm, tmp_path / "bad")))
    assert r.status_code == 400 and "num_transformer_submodules 1" in r.json()["error"]
    assert client.get("/adapters/bad").status_code == 404  # nothing stored
