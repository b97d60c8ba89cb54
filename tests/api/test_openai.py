"""OpenAI routes in process: completions, chat completions, models; parsed with the openai package's own types."""

from __future__ import annotations

import json

from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk

PROMPT = "The quick brown fox"


def sse(text: str) -> list[str]:
    return [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]


def _tgi(client, prompt, n, **params):
    body = {"inputs": prompt, "parameters": {"max_new_tokens": n, "details": True, **params}}
    return client.post("/generate", json=body).json()


def test_completion_matches_tgi_route_and_reports_usage(client):
    r = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 6, "temperature": 0})
    assert r.status_code == 200, r.text
    c = Completion(**r.json())
    tgi = _tgi(client, PROMPT, 6)
    assert c.choices[0].text == tgi["generated_text"]
    assert c.usage.completion_tokens == tgi["details"]["generated_tokens"]
    assert c.usage.prompt_tokens == tgi["details"]["prompt_tokens"]
    assert c.usage.total_tokens == c.usage.prompt_tokens + c.usage.completion_tokens
    assert c.choices[0].finish_reason == {"length": "length", "eos_token": "stop"}[tgi["details"]["finish_reason"]]
    assert c.model == client.get("/info").json()["model_id"]


def test_completion_stop_is_trimmed_like_openai(client):
    full = _tgi(client, PROMPT, 10, ignore_eos_token=True)["generated_text"]
    stop = full[4:7]
    assert stop.strip(), "the tiny model produced too little text for this test"
    body = {"prompt": PROMPT, "max_tokens": 10, "temperature": 0, "stop": [stop], "ignore_eos": True}
    c = Completion(**client.post("/v1/completions", json=body).json())
    assert c.choices[0].text == full[: full.find(stop)]
    assert c.choices[0].finish_reason == "stop"
    chunks = sse(client.post("/v1/completions", json={**body, "stream": True}).text)
    assert chunks[-1] == "[DONE]"
    streamed = "".join(json.loads(x)["choices"][0]["text"] for x in chunks[:-1])
    assert streamed == c.choices[0].text
    assert json.loads(chunks[-2])["choices"][0]["finish_reason"] == "stop"


def test_completion_echo_and_logprobs(client):
    body = {"prompt": PROMPT, "max_tokens": 4, "temperature": 0, "echo": True, "logprobs": 1, "ignore_eos": True}
    c = Completion(**client.post("/v1/completions", json=body).json())
    text = c.choices[0].text
    assert text.startswith(PROMPT)
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == 4
    assert all(x <= 0 for x in lp.token_logprobs)
    assert lp.text_offset[0] == len(PROMPT)


def test_completion_accepts_token_ids(client):
    ids = client.app.state.service.engine.tokenizer(PROMPT)["input_ids"]
    by_ids = client.post("/v1/completions", json={"prompt": ids, "max_tokens": 4, "temperature": 0}).json()
    by_text = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 4, "temperature": 0}).json()
    assert by_ids["choices"][0]["text"] == by_text["choices"][0]["text"]


def test_stream_usage_chunk(client):
    body = {"prompt": PROMPT, "max_tokens": 3, "temperature": 0, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    chunks = sse(client.post("/v1/completions", json=body).text)
    usage = json.loads(chunks[-2])
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 3


def test_chat_uses_the_chat_template(client):
    messages = [{"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "Hello world!"}]
    r = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 5, "temperature": 0})
    assert r.status_code == 200, r.text
    chat = ChatCompletion(**r.json())
    tokenizer = client.app.state.service.engine.tokenizer
    templated = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(templated, add_special_tokens=False)["input_ids"]
    plain = client.post("/v1/completions", json={"prompt": ids, "max_tokens": 5, "temperature": 0}).json()
    assert chat.choices[0].message.content == plain["choices"][0]["text"]
    assert chat.choices[0].message.role == "assistant"
    assert chat.usage.prompt_tokens == len(ids)


def test_chat_stream_chunks(client):
    body = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 5, "temperature": 0, "stream": True}
    chunks = sse(client.post("/v1/chat/completions", json=body).text)
    assert chunks[-1] == "[DONE]"
    parsed = [ChatCompletionChunk(**json.loads(x)) for x in chunks[:-1]]
    assert parsed[0].choices[0].delta.role == "assistant"
    assert parsed[-1].choices[0].finish_reason in ("length", "stop")
    text = "".join(p.choices[0].delta.content or "" for p in parsed)
    whole = client.post("/v1/chat/completions", json={**body, "stream": False}).json()
    assert text == whole["choices"][0]["message"]["content"]


def test_chat_logprobs(client):
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "temperature": 0, "logprobs": True,
            "ignore_eos": True}
    chat = ChatCompletion(**client.post("/v1/chat/completions", json=body).json())
    assert len(chat.choices[0].logprobs.content) == 3


def test_models_lists_base_model(client):
    data = client.get("/v1/models").json()
    assert data["object"] == "list"
    assert data["data"][0]["id"] == client.get("/info").json()["model_id"]
