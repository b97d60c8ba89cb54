"""Every error the API answers, in the one shape {"error", "error_type"}: 400, 401, 404, 413, 422, 429, 503, 504."""

from __future__ import annotations

import json
import threading
import time

import pytest

from tests.api.oracle import saved_peft, upload_parts

PROMPT = "Hello world"


def _err(r, status, error_type=None):
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error", "error_type"}, body
    if error_type:
        assert body["error_type"] == error_type
    return body["error"]


@pytest.mark.parametrize(
    ("params", "words"),
    [
        ({"temperature": 0}, ["parameters.temperature", "greater than 0", "given 0"]),
        ({"top_p": 1.5}, ["parameters.top_p", "less than or equal to 1", "given 1.5"]),
        ({"top_k": 0}, ["parameters.top_k", "greater than 0", "given 0"]),
        ({"max_new_tokens": 0}, ["parameters.max_new_tokens", "greater than 0"]),
        ({"max_new_tokens": 100000}, ["parameters.max_new_tokens", "512", "100000"]),
        ({"repetition_penalty": -1}, ["parameters.repetition_penalty", "given -1"]),
        ({"seed": -3}, ["parameters.seed", "given -3"]),
        ({"seed": 2**70, "do_sample": True}, ["parameters.seed", "18446744073709551615"]),
        ({"stop": ["a", "b", "c", "d", "e"]}, ["parameters.stop", "4", "given 5"]),
        ({"best_of": 2}, ["parameters.best_of", "given 2"]),
        ({"typical_p": 0.5}, ["typical_p", "not supported", "0.5"]),
        ({"watermark": True}, ["watermark", "not supported"]),
    ],
)
def test_tgi_parameter_validation_names_field_limit_and_value(client, params, words):
    message = _err(client.post("/generate", json={"inputs": PROMPT, "parameters": params}), 422, "validation")
    for word in words:
        assert word in message, message


def test_missing_and_wrong_types(client):
    assert "inputs: field required" in _err(client.post("/generate", json={"parameters": {}}), 422)
    assert "inputs" in _err(client.post("/generate", json={"inputs": ""}), 422)
    assert "inputs" in _err(client.post("/generate", json={"inputs": 5}), 422)
    assert "messages" in _err(client.post("/v1/chat/completions", json={"messages": []}), 422)


def test_malformed_json_is_400(client):
    r = client.post("/generate", content=b'{"inputs": ', headers={"content-type": "application/json"})
    assert "not valid JSON" in _err(r, 400, "bad_request")


def test_input_too_long(client):
    message = _err(client.post("/generate", json={"inputs": "hello " * 400}), 422, "validation")
    assert "256" in message


def test_openai_validation(client):
    msg = _err(client.post("/v1/completions", json={"prompt": PROMPT, "n": 3}), 422)
    assert "n: only n=1 is supported" in msg and "given 3" in msg
    msg = _err(client.post("/v1/completions", json={"prompt": PROMPT, "presence_penalty": 0.5}), 422)
    assert "presence_penalty" in msg and "given 0.5" in msg
    msg = _err(client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 100000}), 422)
    assert "max_tokens" in msg and "512" in msg
    msg = _err(client.post("/v1/completions", json={"prompt": ["a", "b"]}), 422)
    assert "batch of 2" in msg
    msg = _err(client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}],
                                                          "temperature": 3}), 422)
    assert "temperature" in msg and "given 3" in msg


def test_not_found(client):
    _err(client.post("/generate", json={"inputs": PROMPT, "parameters": {"adapter_id": "ghost"}}), 404, "not_found")
    _err(client.post("/generate_stream", json={"inputs": PROMPT, "parameters": {"adapter_id": "ghost"}}), 404)
    msg = _err(client.post("/v1/completions", json={"model": "ghost", "prompt": PROMPT}), 404, "not_found")
    assert "ghost" in msg
    _err(client.get("/adapters/ghost"), 404, "not_found")
    _err(client.delete("/adapters/ghost"), 404, "not_found")
    _err(client.post("/classify", json={"inputs": "x", "adapter_id": "ghost"}), 404)


def test_bad_uploads_are_400_and_leave_no_trace(client, tiny_llama_dir, tmp_path):
    _, adapter_dir = saved_peft(tiny_llama_dir, "prompt_tuning", tmp_path / "a")
    parts = upload_parts(adapter_dir)
    msg = _err(client.put("/adapters/broken", files={"adapter_config.json": parts["adapter_config.json"]}), 400)
    assert "adapter_model" in msg
    _err(client.put("/adapters/broken", files={"adapter_config.json": ("c", b"{not json"),
                                              "adapter_model.safetensors": parts["adapter_model.safetensors"]}), 400)
    _err(client.put("/adapters/broken", files={"weights": ("w", b"x")}), 400, "bad_request")
    _err(client.put("/adapters/broken", content=b"raw", headers={"content-type": "application/octet-stream"}), 400)
    _err(client.put("/adapters/broken", files=parts, data={"labels": "not json"}), 400)
    _err(client.put("/adapters/bad%20id!", files=parts), 400)
    assert client.get("/adapters/broken").status_code == 404
    store = client.app.state.service.settings.adapters
    assert not any("broken" in p.name for p in store.rglob("*"))


def test_upload_too_large_is_413(serve, tiny_llama_dir, tmp_path):
    _, adapter_dir = saved_peft(tiny_llama_dir, "prefix", tmp_path / "big")
    parts = upload_parts(adapter_dir)
    with serve(max_upload_bytes=1000) as c:
        msg = _err(c.put("/adapters/big", files=parts), 413, "too_large")
        assert "max_upload_bytes=1000" in msg
        assert c.get("/adapters/big").status_code == 404

        def chunked():  # no Content-Length: the limit is enforced on the parts as they stream in
            yield (b'--b\r\nContent-Disposition: form-data; name="adapter_model.safetensors"; filename="w"\r\n'
                   b"Content-Type: application/octet-stream\r\n\r\n")
            for _ in range(100):
                yield b"x" * 500

        r = c.put("/adapters/big", content=chunked(), headers={"content-type": "multipart/form-data; boundary=b"})
        assert "the files' size" in _err(r, 413, "too_large")
        assert c.get("/adapters/big").status_code == 404


def test_request_bodies_are_held_to_max_request_bytes(serve, tiny_llama_dir, tmp_path):
    _, adapter_dir = saved_peft(tiny_llama_dir, "prefix", tmp_path / "big")
    parts = upload_parts(adapter_dir)
    size = sum(len(p[1]) for p in parts.values())
    assert size > 2048
    with serve(max_request_bytes=2048, api_key="k") as c:
        auth = {"authorization": "Bearer k"}
        body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 2}}
        assert c.post("/generate", json=body, headers=auth).status_code == 200
        padded = {**body, "pad": "x" * 3000}
        content = json.dumps(padded).encode()
        json_type = {"content-type": "application/json"}
        for route in ("/generate", "/generate_stream", "/v1/completions", "/v1/chat/completions", "/classify"):
            r = c.post(route, content=content, headers={**auth, **json_type})  # a declared Content-Length
            msg = _err(r, 413, "too_large")
            assert msg == f"request body too large: {len(content)} bytes, over max_request_bytes=2048"
            assert _err(c.post(route, content=content, headers=json_type), 413, "too_large")  # no key: the same

        def chunked():  # no Content-Length: refused as soon as the body outgrows the limit
            yield b'{"inputs": "'
            for _ in range(100):
                yield b"x" * 100
            yield b'"}'

        r = c.post("/generate", content=chunked(), headers={**auth, "content-type": "application/json"})
        assert "over max_request_bytes=2048" in _err(r, 413, "too_large")
        # an adapter upload is held to max_upload_bytes alone
        assert c.put("/adapters/big", files=parts, headers=auth).status_code == 201
        assert c.post("/generate", json={**body, "adapter_id": "big"}, headers=auth).status_code == 200
        assert 'status="413"' in c.get("/metrics", headers=auth).text  # counted like any answer


def test_auth(serve, tiny_llama_dir, tmp_path):
    _, adapter_dir = saved_peft(tiny_llama_dir, "prompt_tuning", tmp_path / "a")
    user, admin = {"Authorization": "Bearer user-key"}, {"Authorization": "Bearer admin-key"}
    with serve(api_key="user-key", admin_key="admin-key") as c:
        assert c.get("/health").status_code == 200
        for method, path in [("get", "/info"), ("get", "/metrics"), ("get", "/adapters"), ("get", "/v1/models")]:
            r = getattr(c, method)(path)
            assert "missing API key" in _err(r, 401, "unauthorized")
            assert r.headers["www-authenticate"] == "Bearer"
            _err(getattr(c, method)(path, headers={"Authorization": "Bearer nope"}), 401)
            assert getattr(c, method)(path, headers=user).status_code == 200
            assert getattr(c, method)(path, headers=admin).status_code == 200
        _err(c.post("/generate", json={"inputs": PROMPT}), 401)
        assert c.post("/generate", json={"inputs": PROMPT}, headers=user).status_code == 200
        _err(c.put("/adapters/a", files=upload_parts(adapter_dir), headers=user), 401)
        assert c.put("/adapters/a", files=upload_parts(adapter_dir), headers=admin).status_code == 201
        _err(c.delete("/adapters/a", headers=user), 401)
        assert c.delete("/adapters/a", headers=admin).status_code == 204
        # the schema needs the key like every other route; the browser docs, which cannot send it, are off
        _err(c.get("/openapi.json"), 401, "unauthorized")
        assert "/generate" in c.get("/openapi.json", headers=user).json()["paths"]
        for path in ("/docs", "/redoc"):
            _err(c.get(path, headers=user), 404, "not_found")


def test_docs_are_open_without_a_key(client):
    assert client.get("/docs").status_code == 200
    assert client.get("/redoc").status_code == 200
    assert "/v1/completions" in client.get("/openapi.json").json()["paths"]


def test_overlong_text_is_refused_before_tokenizing(client):
    text = "a" * (256 * 32 + 1)  # max_input_tokens 256 in these tests
    cases = [
        ("/generate", {"inputs": text}, "inputs"),
        ("/generate_stream", {"inputs": text}, "inputs"),
        ("/", {"inputs": text, "stream": True}, "inputs"),
        ("/v1/completions", {"prompt": text}, "prompt"),
        ("/v1/completions", {"prompt": [text], "stream": True}, "prompt"),
        ("/v1/chat/completions", {"messages": [{"role": "system", "content": text[:5000]},
                                               {"role": "user", "content": text[5000:]}]}, "messages"),
        ("/classify", {"inputs": ["fine", text]}, "inputs[1]"),
    ]
    for path, body, field in cases:
        message = _err(client.post(path, json=body), 422, "validation")
        assert message == f"{field} must be at most 8192 characters (max_input_tokens x 32), given 8193", path


def _wait_for(condition, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.005)
    assert condition()


def test_queue_full_is_429_with_retry_after(serve):
    long = {"inputs": PROMPT, "parameters": {"max_new_tokens": 400, "ignore_eos_token": True}}
    with serve(max_queue=1, max_batch_size=1) as c:
        engine = c.app.state.service.engine
        background = [threading.Thread(target=c.post, args=("/generate",), kwargs={"json": long}) for _ in range(2)]
        background[0].start()
        _wait_for(lambda: engine.stats()["running"] == 1)  # the only batch slot is taken
        background[1].start()
        _wait_for(lambda: engine.stats()["queue_depth"] == 1)  # and the queue is full
        r = c.post("/generate", json=long)
        _err(r, 429, "overloaded")
        assert int(r.headers["retry-after"]) >= 1
        engine.stop()  # ends the running and the waiting request at once
        for t in background:
            t.join(timeout=60)


def test_engine_stopped_is_503(serve):
    with serve() as c:
        c.app.state.service.engine.stop()
        assert c.get("/health").status_code == 503
        _err(c.post("/generate", json={"inputs": PROMPT}), 503, "unavailable")
        _err(c.post("/v1/completions", json={"prompt": PROMPT}), 503)


def test_request_timeout_is_504(serve):
    long = {"inputs": PROMPT, "parameters": {"max_new_tokens": 400, "ignore_eos_token": True}}
    with serve(request_timeout=0.2) as c:
        msg = _err(c.post("/generate", json=long), 504, "timeout")
        assert "request_timeout=0.2" in msg
        r = c.post("/generate_stream", json=long)
        assert r.status_code == 200  # the stream had started; its last event is the error
        assert '"error_type": "timeout"' in r.text.strip().splitlines()[-1]
        deadline = time.monotonic() + 10
        while c.app.state.service.engine.stats()["running"] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert c.app.state.service.engine.stats()["running"] == 0


LONG_TGI = {"inputs": PROMPT, "parameters": {"max_new_tokens": 400, "ignore_eos_token": True}}
LONG_OPENAI = {"prompt": PROMPT, "max_tokens": 400, "ignore_eos": True, "temperature": 0, "stream": True}


def _three_requests_then(c, when_all_running):
    """A TGI stream, an OpenAI stream and a plain /generate, all running, then `when_all_running(real_step, ...)`
    is called from inside the engine's step once the batch holds all three (and again for any later forward over
    that batch, as when the engine retries a failed step part by part); returns the responses."""
    engine = c.app.state.service.engine
    real = engine.runner.step
    done = threading.Event()
    seen = {"kv": None}

    def step(decode, groups):
        if decode is not None and ((len(decode.ids) == 3 and not done.is_set()) or decode.kv is seen["kv"]):
            done.set()
            seen["kv"] = decode.kv
            return when_all_running(real, decode, groups)
        return real(decode, groups)

    engine.runner.step = step
    calls = {"tgi": ("/generate_stream", LONG_TGI), "openai": ("/v1/completions", LONG_OPENAI),
             "plain": ("/generate", LONG_TGI)}
    out = {}
    threads = [threading.Thread(target=lambda k=k, p=p, b=b: out.__setitem__(k, c.post(p, json=b)))
               for k, (p, b) in calls.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    engine.runner.step = real
    assert done.is_set()
    return out


def _stream_tail(r, error_type):
    """The events of a stream that started well and ended with an error event of `error_type`."""
    assert r.status_code == 200, r.text
    payloads = [line[len("data: "):] for line in r.text.splitlines() if line.startswith("data: ")]
    events = [json.loads(p) for p in payloads if p != "[DONE]"]
    assert set(events[-1]) == {"error", "error_type"}, events[-1]
    assert events[-1]["error_type"] == error_type
    return payloads, events


def test_engine_stopping_mid_stream_ends_every_stream_with_an_error_event(serve):
    with serve() as c:
        engine = c.app.state.service.engine
        stopper = threading.Thread(target=engine.stop)

        def stop_now(real, *args):
            stopper.start()  # stop() waits for this step to end; the running rows then fail with EngineStopped
            _wait_for(lambda: not engine.ready)
            return real(*args)

        out = _three_requests_then(c, stop_now)
        stopper.join(timeout=60)
    payloads, events = _stream_tail(out["tgi"], "unavailable")
    assert len(events) >= 2 and all("token" in e for e in events[:-1])  # tokens had streamed before the error
    payloads, events = _stream_tail(out["openai"], "unavailable")
    assert payloads[-1] == "[DONE]" and "choices" in events[0]
    _err(out["plain"], 503, "unavailable")


def test_a_failed_engine_step_is_a_500_with_its_reason_and_the_server_goes_on(serve):
    def fail(real, *args):
        raise RuntimeError("injected fault")

    with serve() as c:
        out = _three_requests_then(c, fail)
        assert c.post("/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 3}}).status_code == 200
    _, events = _stream_tail(out["tgi"], "internal")
    assert "injected fault" in events[-1]["error"]
    payloads, events = _stream_tail(out["openai"], "internal")
    assert payloads[-1] == "[DONE]"
    assert "generation failed: injected fault" in _err(out["plain"], 500, "internal")


def test_limits_name_the_field_of_the_protocol_the_client_spoke(client):
    """One check per limit (engine/validation.py); the message uses the client's own field names."""
    long = "hello " * 300  # over max_input_tokens 256 in tokens, not in characters
    msg = _err(client.post("/v1/completions", json={"prompt": long, "max_tokens": 2}), 422, "validation")
    assert msg.startswith("prompt: ") and "max_input_tokens 256" in msg
    msg = _err(client.post("/generate", json={"inputs": long}), 422, "validation")
    assert msg.startswith("inputs: ") and "max_input_tokens 256" in msg
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 100000}
    msg = _err(client.post("/v1/chat/completions", json=chat), 422, "validation")
    assert msg.startswith("max_completion_tokens must be between 1 and 512")
    msg = _err(client.post("/v1/completions", json={"prompt": "hi", "stop": [""]}), 422, "validation")
    assert msg == "stop: stop sequences must not be empty"
    msg = _err(client.post("/generate", json={"inputs": "hi", "parameters": {"stop": [""]}}), 422, "validation")
    assert msg == "parameters.stop: stop sequences must not be empty"
