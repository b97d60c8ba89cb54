"""The real openai, text-generation and lorax-client packages against a real server, streaming and not."""

from __future__ import annotations

import httpx
import openai
import pytest
from transformers import AutoTokenizer

from prompt_server.client import AdminClient
from tests.api.oracle import peft_greedy, saved_peft
from tests.tgi_clients import run_clients

PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def model_id(server) -> str:
    return httpx.get(f"{server}/info").json()["model_id"]


@pytest.fixture(scope="module")
def adapter(server, tiny_llama_dir, tmp_path_factory):
    peft, adapter_dir = saved_peft(tiny_llama_dir, "p_tuning_lstm", tmp_path_factory.mktemp("a") / "lstm", seed=11)
    with AdminClient(server) as admin:
        admin.push("lstm", adapter_dir)
    return peft


def test_text_generation_client(server):
    out = run_clients("generate", client="tgi", url=server, prompt=PROMPT,
                      kwargs={"max_new_tokens": 8, "decoder_input_details": True},
                      bad={"too_long": {"max_new_tokens": 100000}})
    response, streamed = out["response"], out["stream"]
    details = response["details"]
    assert details["generated_tokens"] == len(details["tokens"]) > 0
    assert details["prefill"] and details["prefill"][0]["logprob"] is None
    assert "".join(r["token"]["text"] for r in streamed if not r["token"]["special"]) == response["generated_text"]
    assert streamed[-1]["generated_text"] == response["generated_text"]
    assert streamed[-1]["details"]["finish_reason"] == details["finish_reason"]
    # the server's limit, reported as TGI's validation error
    assert out["errors"]["too_long"]["type"] == "ValidationError"
    assert "max_new_tokens" in out["errors"]["too_long"]["message"]


def test_lorax_client_with_an_adapter(server, adapter, tiny_llama_dir):
    expected = peft_greedy(adapter, tiny_llama_dir, PROMPT, 10)
    out = run_clients("generate", client="lorax", url=server, prompt=PROMPT,
                      kwargs={"adapter_id": "lstm", "max_new_tokens": 10, "details": True},
                      bad={"ghost": {"adapter_id": "ghost"}})
    response, streamed = out["response"], out["stream"]
    assert [t["id"] for t in response["details"]["tokens"]] == expected
    assert [r["token"]["id"] for r in streamed] == expected
    assert streamed[-1]["details"]["prompt_tokens"] == response["details"]["prompt_tokens"]
    assert out["errors"]["ghost"]["type"] == "NotFoundError"


def test_openai_client(server, model_id, adapter, tiny_llama_dir):
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
    assert {m.id for m in client.models.list()} >= {model_id, "lstm"}
    completion = client.completions.create(model=model_id, prompt=PROMPT, max_tokens=6, temperature=0)
    text = completion.choices[0].text
    chunks = list(client.completions.create(model=model_id, prompt=PROMPT, max_tokens=6, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    assert completion.usage.completion_tokens > 0
    with_adapter = client.completions.create(model="lstm", prompt=PROMPT, max_tokens=10, temperature=0)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    expected = tokenizer.decode(peft_greedy(adapter, tiny_llama_dir, PROMPT, 10), skip_special_tokens=True)
    assert with_adapter.choices[0].text == expected

    messages = [{"role": "user", "content": "Hello there"}]
    chat = client.chat.completions.create(model="lstm", messages=messages, max_tokens=6, temperature=0)
    stream = client.chat.completions.create(model="lstm", messages=messages, max_tokens=6, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == chat.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="ghost", prompt=PROMPT)
    with pytest.raises(openai.UnprocessableEntityError):
        client.completions.create(model=model_id, prompt=PROMPT, n=2)
