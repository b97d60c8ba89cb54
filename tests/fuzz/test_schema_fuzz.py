"""The server fuzzed over HTTP, in process, on the tiny Llama:

1. schemathesis over the app's own OpenAPI schema: every route and method, positive and negative data (its
   examples, coverage and fuzzing phases; the coverage phase also sends methods a route does not take). Checks: no
   5xx, responses and content types as the schema declares, the one error shape on every 4xx, no internal error
   inside an event stream, every request answered within request-timeout (a hang fails the run).
2. hostile JSON bodies for every JSON route, shaped like the route's body but holding what schemathesis does not
   write: lone surrogates (\\ud800), 64-bit edge integers, NaN and Infinity, unknown fields, wrong types anywhere.
3. multipart adapter uploads: real adapters' files, mutated, crafted, archived, in any combination of parts.

Then the server must still be healthy: /health 200, a normal /generate and one with an adapter answer 200, an
adapter upload round trip works, nothing is left queued or running, and no error was logged.

PUT /adapters/{adapter_id} does not declare its multipart body in the OpenAPI schema (the route reads the request
stream itself), so the schema fuzzed here adds that declaration (UPLOAD_BODY) to the app's own schema; every other
route is fuzzed from the schema exactly as the app serves it.

Budget: PROMPT_SERVER_FUZZ_EXAMPLES (see fuzzing.py) sets schemathesis' max_examples per operation and the
examples of suites 2 and 3; the short form keeps the file well under a minute on two CPU cores."""

from __future__ import annotations

import copy
import io
import json
import logging
import time
import urllib.parse
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import schemathesis
import torch
from fastapi.testclient import TestClient
from hypothesis import given
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import content_type_conformance, response_schema_conformance

from prompt_server.api.upload import FILE_PARTS
from prompt_server.config import Settings
from prompt_server.main import create_app
from tests.fuzz import strategies as S
from tests.fuzz.fuzzing import LONG, SEED, SUPPRESSED, TALLY, examples, fuzz_settings

SUITE_SCHEMA = "schemathesis"
SUITE_JSON = "hostile JSON"
SUITE_UPLOAD = "multipart uploads"
LIMITS = {"max_new_tokens": 8, "default_max_new_tokens": 2, "max_input_tokens": 128, "max_stop_sequences": 4,
          "max_batch_size": 4, "max_queue": 64, "request_timeout": 20.0, "max_upload_bytes": 64 * 1024}
REQUEST_TIMEOUT = 30  # seconds a fuzzed request may take before the run fails as hung (above request_timeout)
SEEDED = ("fuzz-pt", "fuzz-prefix")  # adapters uploaded before fuzzing, which the strategies name

# The multipart body PUT /adapters/{adapter_id} reads (prompt_server/api/upload.py), as the schema would declare it.
UPLOAD_BODY = {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object",
    "properties": {
        "adapter_config.json": {"type": "string", "format": "binary"},
        "adapter_model.safetensors": {"type": "string", "format": "binary"},
        "adapter_model.bin": {"type": "string", "format": "binary"},
        "archive": {"type": "string", "format": "binary"},
        "labels": {"type": "string", "description": "a JSON list of label strings"},
    },
}}}}


def fuzzed_schema() -> dict[str, Any]:
    """The app's own OpenAPI schema (no model is loaded to build it), with the upload body declared."""
    raw = copy.deepcopy(create_app(Settings(api_key=None, admin_key=None)).openapi())
    put = raw["paths"]["/adapters/{adapter_id}"]["put"]
    if "requestBody" not in put:
        put["requestBody"] = UPLOAD_BODY
    return raw


class LateApp:
    """The ASGI app schemathesis calls: it forwards requests to the server the fixture started, and answers the
    lifespan itself, since the fixture owns the server's (schemathesis would start and stop it around every
    operation's test, loading the model each time)."""

    def __init__(self) -> None:
        self.app: Any = None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        assert self.app is not None, "the fuzz_server fixture has not started the server"
        await self.app(scope, receive, send)


APP = LateApp()
CONFIG = schemathesis.Config.from_dict({
    "seed": SEED,
    "request-timeout": REQUEST_TIMEOUT,
    "suppress-health-check": [h.name for h in SUPPRESSED],
    "generation": {"mode": "all", "max-examples": examples(20), "database": "none", "no-shrink": not LONG},
    # the coverage phase's deterministic cases: in the short form only its negative ones (boundary violations, wrong
    # types, missing fields, unexpected methods), as its ~600 positive ones mostly generate text and take a while
    "phases": {"stateful": {"enabled": False},
               "coverage": {"generation": {"mode": "all" if LONG else "negative"}}},
})
schema = schemathesis.openapi.from_dict(fuzzed_schema(), config=CONFIG)
schema.app = APP


# ---- the server -----------------------------------------------------------------------------------------------------
@dataclass
class Server:
    client: TestClient
    dims: dict[str, int]
    errors: list[logging.LogRecord] = field(default_factory=list)

    @property
    def service(self) -> Any:
        return self.client.app.state.service


class _Errors(logging.Handler):
    def __init__(self, records: list[logging.LogRecord]):
        super().__init__(logging.ERROR)
        self.records = records

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def put_files(client: TestClient, adapter_id: str, files: dict[str, bytes], labels: list[str] | None = None):
    parts: dict[str, Any] = {name: (name, data) for name, data in files.items()}
    if labels is not None:
        parts["labels"] = (None, json.dumps(labels).encode())
    return client.put(f"/adapters/{adapter_id}", files=parts)


@pytest.fixture(scope="module", autouse=True)
def fuzz_server(tiny_llama_dir, tmp_path_factory) -> Iterator[Server]:
    settings = Settings(model=str(tiny_llama_dir), adapters=tmp_path_factory.mktemp("fuzz-store"), **LIMITS)
    dims = S.model_dims(tiny_llama_dir)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        for adapter_id, kind in zip(SEEDED, ("prompt", "prefix")):
            r = put_files(client, adapter_id, S.adapter_files(kind, dims), labels=["positive", "negative"])
            assert r.status_code == 201, r.text
        server = Server(client, dims)
        handler = _Errors(server.errors)
        logger = logging.getLogger("prompt_server")
        logger.addHandler(handler)
        APP.app = client.app
        try:
            yield server
        finally:
            APP.app = None
            logger.removeHandler(handler)


# ---- shared response checks -----------------------------------------------------------------------------------------
def error_shape(status: int, content_type: str, body: bytes) -> None:
    """Every 4xx is {"error": str, "error_type": str}."""
    if status < 400:
        return
    assert content_type.startswith("application/json"), f"{status} answered as {content_type!r}"
    doc = json.loads(body)
    assert isinstance(doc, dict) and isinstance(doc.get("error"), str) and isinstance(doc.get("error_type"), str), doc


def stream_events_ok(content_type: str, body: bytes) -> None:
    """An event stream's events are JSON (or [DONE]); an error inside one is never an internal error."""
    if not content_type.startswith("text/event-stream"):
        return
    for line in body.decode("utf-8").splitlines():
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        event = json.loads(line.removeprefix("data: "))
        assert event.get("error_type") != "internal", f"internal error inside the stream: {event}"


def one_error_shape(ctx, response, case) -> None:
    error_shape(response.status_code, (response.headers.get("content-type") or [""])[0], response.content)


def no_internal_stream_error(ctx, response, case) -> None:
    stream_events_ok((response.headers.get("content-type") or [""])[0], response.content)


CHECKS = [not_a_server_error, response_schema_conformance, content_type_conformance, one_error_shape,
          no_internal_stream_error]


# ---- 1. schemathesis over the schema --------------------------------------------------------------------------------
@schema.parametrize()
def test_schema_operation(case):
    TALLY.add(SUITE_SCHEMA, case.operation.label, f"{case.meta.phase.name.value}/{case.meta.generation.mode.value}")
    response = case.call_and_validate(checks=CHECKS)
    TALLY.status(SUITE_SCHEMA, response.status_code)


def test_schema_covered_every_operation():
    """Every operation in the schema got positive and negative inputs (PUT with its multipart body declared)."""
    tried = {(target, strategy.split("/")[1]) for suite, target, strategy in TALLY.counts if suite == SUITE_SCHEMA}
    if not tried:
        pytest.skip("the schemathesis tests did not run in this session")
    operations = {f"{m.upper()} {p}" for p, ops in schema.raw_schema["paths"].items() for m in ops}
    for label in sorted(operations):
        assert (label, "positive") in tried and (label, "negative") in tried, label
    assert schema.raw_schema["paths"]["/adapters/{adapter_id}"]["put"]["requestBody"]


# ---- 2. hostile JSON bodies -----------------------------------------------------------------------------------------
def send_json(client: TestClient, route: str, doc: bytes):
    method, path = route.split(" ", 1)
    return client.request(method, path, content=doc, headers={"content-type": "application/json"})


def check_answer(r, suite: str) -> None:
    TALLY.status(suite, r.status_code)
    assert r.status_code < 500, f"{r.status_code}: {r.text[:500]}"
    content_type = r.headers.get("content-type", "")
    error_shape(r.status_code, content_type, r.content)
    stream_events_ok(content_type, r.content)
    if r.status_code == 200 and content_type.startswith("application/json"):
        json.loads(r.content)


@pytest.mark.parametrize("route", sorted(S.ROUTE_BODIES))
def test_hostile_json(fuzz_server, route):
    @fuzz_settings(short=30, shrink_in_short_form=False)
    @given(body=S.ROUTE_BODIES[route])
    def run(body):
        TALLY.add(SUITE_JSON, route, "route-shaped JSON")
        check_answer(send_json(fuzz_server.client, route, S.json_bytes(body)), SUITE_JSON)

    run()


# a few bodies no JSON serializer writes, byte for byte
RAW_BODIES = [
    b'{"inputs": "a", "parameters": {"max_new_tokens": 1' + b"0" * 5000 + b"}}",  # more digits than Python reads
    b'{"inputs": ' + b"[" * 5000 + b"]" * 5000 + b"}",  # deeper than the parser recurses
    b'{"inputs": "\\ud800", "parameters": {"adapter_id": "\\udc00"}}',
    b'{"prompt": "a", "model": "\\ud800"}',
    b'{"messages": [{"role": "user", "content": "\\ud800"}]}',
    b'{"inputs": ["a"], "labels": ["\\ud800", "b"]}',
    b'{"inputs": "a"} trailing',
    b"\xff\xfe\x00\x00",
    b"",
]


@pytest.mark.parametrize("route", sorted(S.ROUTE_BODIES))
def test_raw_bodies(fuzz_server, route):
    for doc in RAW_BODIES:
        TALLY.add(SUITE_JSON, route, "raw bytes")
        check_answer(send_json(fuzz_server.client, route, doc), SUITE_JSON)


# ---- 3. multipart uploads -------------------------------------------------------------------------------------------
BOUNDARY = "fuzz-boundary-7d3f"
UPLOAD_IDS = st.sampled_from(["fz-up-a", "fz-up-b", "fz-up-a", ".hidden", "-dash", "a" * 129, "..", "%2e%2e",
                              "x y", "ü"])


def multipart(parts: list[tuple[str, bytes]]) -> bytes:
    out = io.BytesIO()
    for name, data in parts:
        out.write(f"--{BOUNDARY}\r\n".encode())
        out.write(f'Content-Disposition: form-data; name="{name}"; filename="{name}"\r\n'.encode())
        out.write(b"Content-Type: application/octet-stream\r\n\r\n")
        out.write(data)
        out.write(b"\r\n")
    out.write(f"--{BOUNDARY}--\r\n".encode())
    return out.getvalue()


DAMAGE = ["none", "none", "none", "none", "config", "weights", "archive", "parts", "labels", "content-type", "size",
          "all"]


def _bin(files: dict[str, bytes]) -> bytes:
    """The weights as a pickled .bin (what torch.save writes), from the safetensors file."""
    from safetensors.torch import load

    buf = io.BytesIO()
    torch.save(load(files["adapter_model.safetensors"]), buf)
    return buf.getvalue()


@st.composite
def upload(draw, dims: dict[str, int]) -> tuple[str, list[tuple[str, bytes]], str]:
    """(adapter id, parts, content type): a real adapter's files sent loose or as an archive, with or without labels;
    then one thing damaged (the config, the weights, the archive, the set of parts, the labels, the content type),
    or all of them, or nothing (about a third of uploads are valid, so the accepted path is fuzzed too)."""
    damage = draw(st.sampled_from(DAMAGE))
    hit = (lambda what: damage in (what, "all"))
    files = S.adapter_files(draw(st.sampled_from(["prompt", "prefix"])), dims, seed=draw(st.integers(0, 3)),
                            num_virtual_tokens=draw(st.sampled_from([1, 4, 200])) if hit("config") else 4)
    if draw(st.booleans()):
        files["adapter_model.bin"] = _bin(files)
        del files["adapter_model.safetensors"]
    if hit("config"):
        config = json.loads(files["adapter_config.json"])
        config[draw(st.sampled_from([*config, "encoder_reparameterization_type", "peft_type"]))] = draw(S.json_values)
        try:
            edited = S.json_bytes(draw(st.one_of(st.just(config), S.poisoned(config))))
        except ValueError:  # an integer Python will not print
            edited = b"{}"
        files["adapter_config.json"] = draw(st.one_of(st.just(edited), S.mutated(files["adapter_config.json"], 2),
                                                      st.sampled_from(S.NASTY_CONFIGS)))
    if hit("weights"):
        name = next(n for n in files if n != "adapter_config.json")
        files[name] = draw(st.one_of(S.mutated(files[name], max_ops=2), S.crafted_safetensors(), st.binary(max_size=64)))
    if hit("size"):  # past max_upload_bytes (64 KiB): a big file, or an archive that unpacks past it
        files["README.md"] = bytes(draw(st.sampled_from([60 << 10, 65 << 10, 1 << 20])))
    if draw(st.booleans()):
        data = S.archive(files, draw(st.sampled_from(S.ARCHIVE_FORMATS)))
        parts = [("archive", draw(S.mutated(data, max_ops=2)) if hit("archive") else data)]
    else:
        parts = list(files.items())
    if hit("parts"):
        names = st.one_of(st.sampled_from(FILE_PARTS + ("labels", "", "README.md")), st.text(max_size=8))
        extra = draw(st.lists(st.tuples(names, st.one_of(*(st.just(v) for v in files.values()),
                                                         st.binary(max_size=32))), min_size=1, max_size=3))
        parts = draw(st.permutations(parts[: draw(st.integers(0, len(parts)))] + extra))
    if hit("labels"):
        labels = draw(st.one_of(st.lists(st.sampled_from(["positive", "negative", "neutral", "", " "]), max_size=4),
                                S.json_values))
        parts.append(("labels", S.json_bytes(labels)))
    elif draw(st.booleans()):
        parts.append(("labels", b'["positive", "negative"]'))
    content_type = f"multipart/form-data; boundary={BOUNDARY}"
    if hit("content-type"):
        content_type = draw(st.sampled_from(["multipart/form-data", "application/json", "text/plain", "",
                                             "multipart/form-data; boundary=other", "multipart/mixed; boundary=x"]))
    adapter_id = draw(UPLOAD_IDS) if damage != "none" else draw(st.sampled_from(["fz-up-a", "fz-up-b"]))
    return adapter_id, parts, content_type


def test_multipart_uploads(fuzz_server):
    client = fuzz_server.client

    @fuzz_settings(short=80, shrink_in_short_form=False)
    @given(up=upload(fuzz_server.dims), delete_after=st.booleans())
    def run(up, delete_after):
        adapter_id, parts, content_type = up
        TALLY.add(SUITE_UPLOAD, "PUT /adapters/{adapter_id}", "multipart")
        path = f"/adapters/{urllib.parse.quote(adapter_id, safe='')}"
        r = client.put(path, content=multipart(parts), headers={"content-type": content_type})
        check_answer(r, SUITE_UPLOAD)
        assert r.status_code in (200, 201, 400, 404, 405, 413, 422), r.text
        listed = client.get("/adapters")  # one upload must never break the listing
        assert listed.status_code == 200, listed.text
        if r.status_code in (200, 201):
            served = r.json()["id"]
            g = client.post("/generate", json={"inputs": "Hello", "parameters": {"adapter_id": served,
                                                                                 "max_new_tokens": 2}})
            # accepted means servable: generation answers (a prompt too long for 200 virtual tokens is a 422)
            assert g.status_code in (200, 422), g.text
            if r.json()["labels"]:
                c = client.post("/classify", json={"inputs": ["Hello"], "adapter_id": served})
                assert c.status_code < 500, c.text
            if delete_after:
                assert client.delete(f"/adapters/{served}").status_code == 204

    run()


def _bzip2_zip_bomb() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_BZIP2) as zf, zf.open("adapter_config.json", "w") as fh:
        for _ in range(8):
            fh.write(bytes(1 << 20))  # 8 MiB of zeros in a few hundred bytes
    return buf.getvalue()


def test_upload_regressions(fuzz_server):
    """Uploads that answered 500 (or inflated a bomb in memory) before their fixes: each is refused with a 4xx, and
    the adapter listing still answers."""
    client, files = fuzz_server.client, S.adapter_files("prompt", fuzz_server.dims)
    config = json.loads(files["adapter_config.json"])
    cases = {f"config-{i}": {**files, "adapter_config.json": nasty} for i, nasty in enumerate(S.NASTY_CONFIGS)}
    cases["config-surrogate-base-model"] = {  # was stored, then GET /adapters answered 500 until it was deleted
        **files, "adapter_config.json": S.json_bytes({**config, "base_model_name_or_path": "\ud800"})}
    expected = {name: 400 for name in cases}
    cases["bzip2-zip-bomb"] = {"archive": _bzip2_zip_bomb()}  # was a 400 (bad CRC) after inflating it whole
    expected["bzip2-zip-bomb"] = 413
    for name, parts in cases.items():
        TALLY.add(SUITE_UPLOAD, "PUT /adapters/{adapter_id}", "regressions")
        r = client.put("/adapters/fz-regression", content=multipart(list(parts.items())),
                       headers={"content-type": f"multipart/form-data; boundary={BOUNDARY}"})
        check_answer(r, SUITE_UPLOAD)
        assert r.status_code == expected[name], (name, r.text)
        assert client.get("/adapters").status_code == 200, name


# ---- regressions of bugs this fuzzing found outside tests/fuzz (fixed in api/service.py and api/upload.py) ----------
@pytest.mark.parametrize("body", [
    pytest.param({"prompt": [-1], "echo": True}, id="echo-negative-token-id"),
    pytest.param({"prompt": [[2**40]], "echo": True}, id="echo-token-id-over-u32"),
    pytest.param({"prompt": [2**40], "echo": True, "stream": True}, id="echo-stream-token-id-over-u32"),
])
def test_echo_of_token_ids_outside_the_vocabulary(fuzz_server, body):
    """Was a 500: the echo decoded the ids (the tokenizer's OverflowError) before the engine checked them."""
    r = fuzz_server.client.post("/v1/completions", json=body)
    assert r.status_code == 422 and "outside the vocabulary" in r.json()["error"], r.text


@pytest.mark.parametrize("labels", [
    pytest.param(b"[1" + b"0" * 5000 + b"]", id="too-many-digits"),  # was a 500 (ValueError)
    pytest.param(b"[" * 60_000, id="nested-too-deep"),  # was a 500 (RecursionError)
    # was stored; then POST /classify with it was a 500 (the tokenizer's TypeError), and GET /adapters too until the
    # AdapterPublic fix
    pytest.param(b'["\\ud800", "b"]', id="lone-surrogate"),
])
def test_upload_labels_regressions(fuzz_server, labels):
    client, files = fuzz_server.client, S.adapter_files("prompt", fuzz_server.dims)
    TALLY.add(SUITE_UPLOAD, "PUT /adapters/{adapter_id}", "regressions")
    r = client.put("/adapters/fz-labels", files={k: (k, v) for k, v in files.items()} | {"labels": (None, labels)})
    check_answer(r, SUITE_UPLOAD)
    assert r.status_code == 400 and "labels" in r.json()["error"], r.text
    assert client.get("/adapters").status_code == 200


# ---- afterwards ----------------------------------------------------------------------------------------------------
def test_server_still_healthy(fuzz_server):
    """Runs last: the engine loop still runs, nothing is left queued or running, nothing was logged as an error."""
    client, service = fuzz_server.client, fuzz_server.service
    assert client.get("/health").status_code == 200
    r = client.post("/generate", json={"inputs": "Once upon a time", "parameters": {"max_new_tokens": 4}})
    assert r.status_code == 200 and r.json()["generated_text"], r.text
    r = client.post("/generate", json={"inputs": "Once upon a time",
                                       "parameters": {"max_new_tokens": 4, "adapter_id": SEEDED[1]}})
    assert r.status_code in (200, 404), r.text  # the fuzzing may have deleted it (DELETE is fuzzed too)
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3,
                                                  "stream": True})
    assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]"), r.text
    r = put_files(client, "fz-after", S.adapter_files("prompt", fuzz_server.dims, seed=9))
    assert r.status_code in (200, 201), r.text
    r = client.post("/v1/completions", json={"model": "fz-after", "prompt": "Hello", "max_tokens": 3})
    assert r.status_code == 200, r.text
    assert client.delete("/adapters/fz-after").status_code == 204
    deadline = time.monotonic() + 10
    while True:  # a cancelled stream's row leaves at the engine's next step
        stats = service.engine.stats()
        if (stats["queue_depth"], stats["running"]) == (0, 0) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert (stats["queue_depth"], stats["running"]) == (0, 0), f"requests left in the engine: {stats}"
    assert service.engine.ready
    logged = [f"{r.name}: {r.getMessage()}" for r in fuzz_server.errors]
    assert not logged, "errors were logged while fuzzing:\n" + "\n".join(logged)
