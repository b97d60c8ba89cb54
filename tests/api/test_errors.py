"""Every error the API answers, in the one shape {"error", "error_type"}: 400, 401, 404, 413, 422, 429, 503, 504."""

from __future__ import annotations

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
