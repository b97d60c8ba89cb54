"""Keys and logs: every route but /health needs a key, every write route the admin key; keys are compared in constant
time; at the default log level a server's log holds no key, no prompt text and no tensor value.

The live tests run a real `prompt-server serve` (uvicorn, the tiny Llama) started with both keys in its environment and
no --log-level flag, its stdout and stderr captured to one file."""

from __future__ import annotations

import hmac
import json
import os
import re
import secrets
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from fastapi.testclient import TestClient
from starlette.requests import Request

from prompt_server.api.deps import require_admin_key, require_api_key
from prompt_server.api.errors import ApiError
from prompt_server.config import Settings
from prompt_server.engine.types import NotServed
from prompt_server.main import create_app
from prompt_server_bench.procs import free_port, stop, wait_healthy
from tests.api.oracle import saved_peft, upload_parts
from tests.e2e.server import REPO

API_KEY = "api-" + secrets.token_hex(16)
ADMIN_KEY = "adm-" + secrets.token_hex(16)
MARKER = "zqxv" + secrets.token_hex(6)  # in every prompt: it must never reach the log
PROMPT = f"Once upon a time {MARKER} said hello"

NO_KEY: dict[str, str] = {}
API = {"Authorization": f"Bearer {API_KEY}"}
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
# keys that are not the admin key, each refused by the write routes
NOT_ADMIN = {
    "no key": NO_KEY,
    "the API key": API,
    "a wrong key": {"Authorization": "Bearer wrong"},
    "the admin key cut short": {"Authorization": f"Bearer {ADMIN_KEY[:-1]}"},
    "the admin key and more": {"Authorization": f"Bearer {ADMIN_KEY}0"},
    "the admin key as Basic": {"Authorization": f"Basic {ADMIN_KEY}"},
    "an empty bearer": {"Authorization": "Bearer"},
}
NO_API = {name: NOT_ADMIN[name] for name in ("no key", "a wrong key", "the admin key as Basic", "an empty bearer")}

# (method, path, JSON body, status with a key): the reads and the generation routes, which need the API key
READS = [
    ("GET", "/info", None, 200),
    ("GET", "/metrics", None, 200),
    ("GET", "/adapters", None, 200),
    ("GET", "/adapters/ghost", None, 404),
    ("GET", "/v1/models", None, 200),
    ("GET", "/openapi.json", None, 200),
    ("POST", "/generate", {"inputs": PROMPT, "parameters": {"max_new_tokens": 4}}, 200),
    ("POST", "/generate_stream", {"inputs": PROMPT, "parameters": {"max_new_tokens": 4}}, 200),
    ("POST", "/", {"inputs": PROMPT, "parameters": {"max_new_tokens": 4}}, 200),
    ("POST", "/v1/completions", {"prompt": PROMPT, "max_tokens": 4}, 200),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 4}, 200),
    ("POST", "/classify", {"inputs": PROMPT, "labels": ["good", "bad"]}, 200),
]
GENERATION_POSTS = {path for method, path, _, _ in READS if method == "POST"}
WRITES = {("PUT", "/adapters/{adapter_id}"), ("DELETE", "/adapters/{adapter_id}")}

# what must never be in the log: the keys (whole or in part), the prompt marker, tensors and runs of floats
FLOATS = re.compile(r"-?\d+\.\d+(?:[eE][-+]?\d+)?(?:\s*,\s*-?\d+\.\d+(?:[eE][-+]?\d+)?){7,}")


def leaks(text: str) -> list[str]:
    found = [name for name, secret in (("API key", API_KEY), ("admin key", ADMIN_KEY), ("prompt text", MARKER),
                                       ("part of the API key", API_KEY[4:20]),
                                       ("part of the admin key", ADMIN_KEY[4:20]))
             if secret in text]
    found += [f"tensor dump {word!r}" for word in ("tensor(", "Parameter containing") if word in text]
    found += [f"float list {m.group(0)[:60]!r}" for m in FLOATS.finditer(text)]
    return found


@dataclass
class Live:
    url: str
    log: Path


@pytest.fixture(scope="module")
def live(tiny_llama_dir, tmp_path_factory):
    """A server with both keys, at the default log level (no --log-level), stdout and stderr in one file."""
    root = tmp_path_factory.mktemp("auth")
    log, port = root / "server.log", free_port()
    cmd = [sys.executable, "-m", "prompt_server.cli", "serve", "--model", str(tiny_llama_dir), "--adapters",
           str(root / "store"), "--host", "127.0.0.1", "--port", str(port), "--max-new-tokens", "64",
           "--max-input-tokens", "256"]
    env = {**os.environ, "PROMPT_SERVER_API_KEY": API_KEY, "PROMPT_SERVER_ADMIN_KEY": ADMIN_KEY,
           "PYTHONUNBUFFERED": "1",  # a print() reaches the file at once, as a log record does
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    for name in ("PROMPT_SERVER_LOG_LEVEL", "UVICORN_LOG_LEVEL"):
        env.pop(name, None)
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, log)
        yield Live(url, log)
    finally:
        stop(proc)
    text = log.read_text(errors="replace")  # the whole run, shutdown included
    assert not leaks(text), (leaks(text), text[-3000:])
    assert "Traceback" not in text, text[-3000:]


def _refused(r: httpx.Response, what: str) -> None:
    assert r.status_code == 401, (what, r.status_code, r.text)
    assert r.json()["error_type"] == "unauthorized" and set(r.json()) == {"error", "error_type"}, r.text
    assert r.headers["www-authenticate"] == "Bearer"


def _call(http: httpx.Client, method: str, path: str, body, headers) -> httpx.Response:
    return http.request(method, path, json=body, headers=headers)


# ---- which route needs which key (the app in-process, on a stub service: a refused request never reaches it) ------
def _routes() -> set[tuple[str, str]]:
    """Every (method, path) the app serves, read from its OpenAPI schema (an app without keys publishes it)."""
    schema = create_app(Settings()).openapi()
    return {(method.upper(), path) for path, item in schema["paths"].items() for method in item}


class _Stub(SimpleNamespace):
    def __getattr__(self, name: str):
        raise AssertionError(f"service.{name}: a request got past the key check")


def _stub_service(settings: Settings) -> _Stub:
    def not_before_the_key():
        raise NotServed("this check must not run before the key check")

    return _Stub(settings=settings, ready=True, check_generates=not_before_the_key,
                 engine=SimpleNamespace(stop=lambda: None), metrics=SimpleNamespace(count_request=lambda *args: None))


def test_every_route_needs_a_key_and_every_write_the_admin_key():
    routes = _routes()
    writes = {(m, p) for m, p in routes if m not in ("GET", "HEAD") and not (m == "POST" and p in GENERATION_POSTS)}
    assert writes == WRITES  # the live test below exercises each write route: a new one belongs there too
    assert {p for m, p in routes if m == "POST"} == GENERATION_POSTS
    settings = Settings(api_key=API_KEY, admin_key=ADMIN_KEY)
    with TestClient(create_app(settings, _stub_service(settings))) as client:
        for method, path in sorted(routes | {("GET", "/openapi.json")}):
            url = path.replace("{adapter_id}", "some-id")
            if path == "/health":
                assert client.request(method, url).status_code == 200
                continue
            for what, headers in NO_API.items():
                _refused(client.request(method, url, headers=headers), f"{method} {path} with {what}")
            if (method, path) in writes:
                for what, headers in NOT_ADMIN.items():
                    _refused(client.request(method, url, headers=headers), f"{method} {path} with {what}")


# ---- constant-time comparison ------------------------------------------------------------------------------------
def _request(authorization: str | None) -> Request:
    headers = [] if authorization is None else [(b"authorization", authorization.encode())]
    return Request({"type": "http", "method": "GET", "path": "/", "headers": headers})


def _admits(check, service, authorization: str | None) -> bool:
    try:
        check(_request(authorization), service)
    except ApiError as exc:
        assert exc.status == 401
        return False
    return True


def test_keys_are_compared_with_hmac_compare_digest(monkeypatch):
    real = hmac.compare_digest
    calls: list[tuple[bytes, bytes]] = []
    forced: list[bool] = []  # when set, the verdict compare_digest gives

    def recording(a, b):
        calls.append((a, b))
        return forced[0] if forced else real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", recording)
    service = SimpleNamespace(settings=Settings(api_key=API_KEY, admin_key=ADMIN_KEY))
    cases = [  # check, token, admitted, keys it may be (each compared, whichever matches)
        (require_api_key, API_KEY, True, 2),
        (require_api_key, ADMIN_KEY, True, 2),
        (require_api_key, "wrong", False, 2),
        (require_admin_key, ADMIN_KEY, True, 1),
        (require_admin_key, API_KEY, False, 1),
        (require_admin_key, ADMIN_KEY + "0", False, 1),
    ]
    for check, token, admitted, keys in cases:
        calls.clear()
        assert _admits(check, service, f"Bearer {token}") is admitted, (check.__name__, token)
        assert len(calls) == keys, (check.__name__, token, calls)
        # what is compared has one length whatever the token's: the time tells nothing of a key's length
        assert len({len(x) for pair in calls for x in pair}) == 1, calls

    # compare_digest alone decides: told "different" it refuses the right key, told "same" it admits a wrong one
    forced.append(False)
    assert not _admits(require_api_key, service, f"Bearer {API_KEY}")
    assert not _admits(require_admin_key, service, f"Bearer {ADMIN_KEY}")
    forced[0] = True
    assert _admits(require_api_key, service, "Bearer wrong")
    assert _admits(require_admin_key, service, "Bearer wrong")
    # without a token nothing is compared, and nothing is admitted
    calls.clear()
    assert not _admits(require_api_key, service, None)
    assert not _admits(require_admin_key, service, "Bearer ")
    assert calls == []


def test_an_empty_key_admits_nobody():
    # Settings refuses an empty key at start-up (tests/api/test_cli.py); the check refuses it too, built past that
    service = SimpleNamespace(settings=Settings.model_construct(api_key="", admin_key=""))
    for authorization in (None, "Bearer", "Bearer ", "Bearer  ", "Basic x", "Bearer x"):
        assert not _admits(require_api_key, service, authorization), authorization
        assert not _admits(require_admin_key, service, authorization), authorization


# ---- the live server ---------------------------------------------------------------------------------------------
def _upload(tiny_llama_dir: Path, tmp_path: Path) -> dict:
    _, adapter_dir = saved_peft(tiny_llama_dir, "prompt_tuning", tmp_path / "adapter", seed=7)
    return upload_parts(adapter_dir)


def test_write_routes_refuse_without_the_admin_key(live, tiny_llama_dir, tmp_path):
    parts = _upload(tiny_llama_dir, tmp_path)
    with httpx.Client(base_url=live.url, timeout=60) as http:
        for what, headers in NOT_ADMIN.items():
            _refused(http.put("/adapters/guarded", files=parts, headers=headers), f"PUT with {what}")
            # refused before the body is read: a body that is no upload at all gets the same answer
            _refused(http.put("/adapters/guarded", content=b"not an upload", headers=headers), f"PUT with {what}")
        assert http.get("/adapters/guarded", headers=ADMIN).status_code == 404  # nothing was written

        assert http.put("/adapters/guarded", files=parts, headers=ADMIN).status_code == 201
        for what, headers in NOT_ADMIN.items():
            _refused(http.delete("/adapters/guarded", headers=headers), f"DELETE with {what}")
            _refused(http.delete("/adapters/ghost", headers=headers), f"DELETE of a missing adapter with {what}")
        assert http.get("/adapters/guarded", headers=API).json()["version"] == 1  # still there, unchanged
        assert http.delete("/adapters/guarded", headers=ADMIN).status_code == 204
        assert http.get("/adapters/guarded", headers=API).status_code == 404


def test_read_and_generation_routes_need_a_key(live):
    with httpx.Client(base_url=live.url, timeout=60) as http:
        for headers in (NO_KEY, API, ADMIN, {"Authorization": "Bearer wrong"}):
            assert http.get("/health", headers=headers).status_code == 200
        for method, path, body, status in READS:
            for what, headers in NO_API.items():
                _refused(_call(http, method, path, body, headers), f"{method} {path} with {what}")
            for headers in (API, ADMIN):
                r = _call(http, method, path, body, headers)
                assert r.status_code == status, (method, path, r.status_code, r.text)
                if path == "/generate_stream":
                    assert '"generated_text"' in r.text and '"error"' not in r.text, r.text
        # a body that is not JSON tells a client without the key nothing: 401 first, 400 only with the key
        for path in sorted(GENERATION_POSTS):
            garbled = {"content": b'{"inputs": "' + MARKER.encode(), "headers": {"content-type": "application/json"}}
            _refused(http.post(path, **garbled), f"malformed POST {path} without a key")
            r = http.post(path, content=garbled["content"], headers={**garbled["headers"], **API})
            assert r.status_code == 400 and r.json()["error_type"] == "bad_request", (path, r.text)


def test_logs_hold_no_keys_prompts_or_tensors(live, tiny_llama_dir, tmp_path):
    """Traffic of every kind (the marker in every prompt, an upload, generations with it, refusals and errors that
    quote the prompt back to the client), then the log of the run so far."""
    parts = _upload(tiny_llama_dir, tmp_path)
    with httpx.Client(base_url=live.url, timeout=60) as http:
        for what, headers in NOT_ADMIN.items():
            _refused(http.put("/adapters/logged", files=parts, headers=headers), what)
        assert http.put("/adapters/logged", files=parts, headers=ADMIN).status_code == 201
        for method, path, body, status in READS:
            _refused(_call(http, method, path, body, NO_KEY), path)
            assert _call(http, method, path, body, API).status_code == status, path
        with_adapter = [
            ("/generate", {"inputs": PROMPT, "parameters": {"adapter_id": "logged", "max_new_tokens": 8,
                                                            "details": True, "decoder_input_details": True}}),
            ("/generate_stream", {"inputs": PROMPT, "parameters": {"adapter_id": "logged", "max_new_tokens": 8}}),
            ("/v1/completions", {"model": "logged", "prompt": PROMPT, "max_tokens": 8, "logprobs": 1, "echo": True}),
        ]
        for path, body in with_adapter:
            r = http.post(path, json=body, headers=API)
            assert r.status_code == 200, (path, r.text)
        # errors whose answers quote the prompt back (to the client, never to the log)
        quoted = [
            ("/generate", {"inputs": PROMPT, "parameters": {"stop": PROMPT}}, 422),
            ("/generate", {"inputs": [PROMPT]}, 422),
            ("/generate", {"inputs": PROMPT * 200}, 422),
            ("/v1/chat/completions", {"messages": [{"role": PROMPT, "content": PROMPT}]}, 422),
            ("/generate", {"inputs": PROMPT, "parameters": {"adapter_id": "ghost"}}, 404),
            ("/classify", {"inputs": PROMPT, "labels": [PROMPT]}, 422),
        ]
        for path, body, status in quoted:
            r = http.post(path, json=body, headers=API)
            assert r.status_code in (status, 400, 422), (path, r.status_code, r.text)
        bad = {"labels": json.dumps([MARKER])}
        assert http.put("/adapters/labelled", files=parts, data=bad, headers=ADMIN).status_code in (200, 201, 400)
        assert http.delete("/adapters/logged", headers=ADMIN).status_code == 204
        http.delete("/adapters/labelled", headers=ADMIN)

    text = live.log.read_text(errors="replace")
    # the default level logs every request (uvicorn's access log) and the start-up: the grep has something to read
    assert re.search(r'"POST /generate HTTP/1\.1" 200', text), text[-2000:]
    assert re.search(r'"PUT /adapters/logged HTTP/1\.1" 401', text), text[-2000:]
    assert re.search(r'"DELETE /adapters/logged HTTP/1\.1" 204', text), text[-2000:]
    assert "serving " in text
    assert not leaks(text), (leaks(text), text[-3000:])
    lines = text.count("\n")
    print(f"\nauth and logs: {len(READS)} read/generation routes x {len(NO_API)} refused keys + 2 keys, "
          f"{len(WRITES)} write routes x {len(NOT_ADMIN)} refused keys + the admin key; the server's log "
          f"({lines} lines at the default level) holds neither key, nor the prompt marker, nor a tensor value")
