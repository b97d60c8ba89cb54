"""TGI / LoRAX routes in process: /generate, /generate_stream and POST /, on the tiny Llama."""

from __future__ import annotations

import json

from tests.tgi_clients import run_clients

PROMPT = "The quick brown fox"


def sse_events(text: str) -> list[dict]:
    return [json.loads(line[len("data:"):]) for line in text.splitlines() if line.startswith("data:")]


def test_generate_details_parse_with_both_clients(client):
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 6, "details": True, "ignore_eos_token": True}}
    r = client.post("/generate", json=body)
    assert r.status_code == 200, r.text
    data = r.json()
    assert run_clients("parse", responses=[data]) == {"parsed": 1}
    details = data["details"]
    assert details["generated_tokens"] == 6 == len(details["tokens"])
    assert details["finish_reason"] == "length"
    assert details["prompt_tokens"] > 0
    assert all(t["logprob"] <= 0 for t in details["tokens"])
    assert data["generated_text"] == "".join(t["text"] for t in details["tokens"] if not t["special"])


def test_generate_is_deterministic_and_matches_stream(client):
    params = {"max_new_tokens": 8, "details": True}
    first = client.post("/generate", json={"inputs": PROMPT, "parameters": params}).json()
    again = client.post("/generate", json={"inputs": PROMPT, "parameters": params}).json()
    assert first == again
    r = client.post("/generate_stream", json={"inputs": PROMPT, "parameters": params})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert run_clients("parse", stream_events=events) == {"parsed": len(events)}
    assert [e["token"]["id"] for e in events] == [t["id"] for t in first["details"]["tokens"]]
    assert all(e["generated_text"] is None for e in events[:-1])
    assert events[-1]["generated_text"] == first["generated_text"]
    assert events[-1]["details"]["generated_tokens"] == len(events)


def test_compat_route_returns_list_or_stream(client):
    params = {"max_new_tokens": 5, "details": True}
    single = client.post("/generate", json={"inputs": PROMPT, "parameters": params}).json()
    listed = client.post("/", json={"inputs": PROMPT, "parameters": params, "stream": False})
    assert listed.status_code == 200
    assert listed.json() == [single]
    streamed = client.post("/", json={"inputs": PROMPT, "parameters": params, "stream": True})
    assert sse_events(streamed.text)[-1]["generated_text"] == single["generated_text"]


def test_return_full_text_prepends_the_prompt(client):
    params = {"max_new_tokens": 4}
    plain = client.post("/generate", json={"inputs": PROMPT, "parameters": params}).json()
    full = client.post("/generate", json={"inputs": PROMPT, "parameters": {**params, "return_full_text": True}})
    assert full.json()["generated_text"] == PROMPT + plain["generated_text"]
    assert plain["details"] is None


def test_decoder_input_details_fill_prefill(client):
    params = {"max_new_tokens": 2, "details": True, "decoder_input_details": True}
    details = client.post("/generate", json={"inputs": PROMPT, "parameters": params}).json()["details"]
    assert run_clients("parse", responses=[{"generated_text": "", "details": details}]) == {"parsed": 1}
    assert len(details["prefill"]) == details["prompt_tokens"]
    assert details["prefill"][0]["logprob"] is None  # the first token has no context to be scored in
    assert all(t["logprob"] <= 0 for t in details["prefill"][1:])


def test_stop_sequence_ends_generation(client):
    base = client.post("/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 8, "details": True,
                                                                          "ignore_eos_token": True}}).json()
    text = base["generated_text"]
    stop = text[3:6]
    assert stop, "the tiny model produced too little text for this test"
    params = {"max_new_tokens": 8, "details": True, "stop": [stop], "ignore_eos_token": True}
    stopped = client.post("/generate", json={"inputs": PROMPT, "parameters": params}).json()
    assert stopped["details"]["finish_reason"] == "stop_sequence"
    assert stop in stopped["generated_text"]  # TGI keeps the stop text
    assert len(stopped["details"]["tokens"]) <= len(base["details"]["tokens"])
    events = sse_events(client.post("/generate_stream", json={"inputs": PROMPT, "parameters": params}).text)
    assert events[-1]["details"]["finish_reason"] == "stop_sequence"
    assert events[-1]["generated_text"] == stopped["generated_text"]


def test_sampling_with_seed_is_reproducible(client):
    params = {"max_new_tokens": 8, "do_sample": True, "temperature": 1.5, "top_k": 50, "top_p": 0.9, "seed": 7,
              "details": True}
    a = client.post("/generate", json={"inputs": PROMPT, "parameters": params}).json()
    b = client.post("/generate", json={"inputs": PROMPT, "parameters": params}).json()
    assert a["generated_text"] == b["generated_text"]
    assert a["details"]["seed"] == 7


def test_truncate_keeps_the_last_tokens(client):
    params = {"max_new_tokens": 2, "details": True, "truncate": 3}
    details = client.post("/generate", json={"inputs": PROMPT + " jumps over the lazy dog",
                                             "parameters": params}).json()["details"]
    assert details["prompt_tokens"] == 3


def test_clients_null_fields_are_accepted(client):
    sent = run_clients("parameters")
    for name, params in sent.items():
        assert params["max_new_tokens"] == 3 and None in params.values(), name  # the clients send nulls
        r = client.post("/", json={"inputs": PROMPT, "parameters": params})
        assert r.status_code == 200, (name, r.text)
        assert r.json()[0]["details"]["generated_tokens"] <= 3
