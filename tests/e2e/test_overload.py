"""Overload on a live server (uvicorn, the tiny Llama, max_queue 8, max_batch_size 4).

A burst of 10 x max_queue concurrent requests of mixed kinds (/generate, /generate_stream, /v1/completions) while the
batch is full: every answer is 200 or 429, every 429 is fast and carries Retry-After and the error body, every 200 is
the text the same request gets alone. Clients that leave mid-flight (streams, plain requests, queued requests) free
their rows, and with them the batch's cache, within a few steps.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import math
import re
import time
from dataclasses import dataclass

import httpx
import pytest

from tests.e2e.server import run_server

MAX_QUEUE = 8
MAX_BATCH = 4
BURST = 10 * MAX_QUEUE
NEW = 12  # tokens a burst request asks for
HOLD = 490  # tokens a long request asks for (the tiny Llama has 512 positions)
REFUSAL_P99 = 1.0  # seconds: the bound on a refusal's answer time
KINDS = ("generate", "stream", "completions")
PROMPTS = ("Once upon a time", "Hello world! How are you", "The quick brown fox", "The weather is good and",
           "Question: what is the capital of France?", "I loved it. The food was")
SETTINGS = ("--max-queue", str(MAX_QUEUE), "--max-batch-size", str(MAX_BATCH), "--max-new-tokens", "500",
            "--max-input-tokens", "256")


@pytest.fixture(scope="module")
def live(tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("overload")
    log = root / "server.log"
    with run_server(tiny_llama_dir, root / "store", log, *SETTINGS) as url:
        yield url, log
    text = log.read_text(errors="replace")
    assert "Traceback" not in text, text[-4000:]


@dataclass
class Outcome:
    kind: str
    prompt: str
    status: int
    seconds: float  # from sending the request to the end of its answer
    headers: dict[str, str]
    body: object  # the JSON body; for a stream that ran, its events
    text: str | None = None  # the generated text of a 200


def _request(kind: str, prompt: str, n: int, hold: bool = False, stream: bool = False) -> tuple[str, dict]:
    if kind == "completions":
        return "/v1/completions", {"prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": hold,
                                   "stream": stream}
    return ("/generate_stream" if kind == "stream" else "/generate"), {
        "inputs": prompt, "parameters": {"max_new_tokens": n, "ignore_eos_token": hold}}


def _events(text: str) -> list:
    return [json.loads(line[5:]) for line in text.splitlines()
            if line.startswith("data:") and line[5:].strip() != "[DONE]"]


def _unchunk(payload: bytes) -> bytes:
    out, at = bytearray(), 0
    while True:
        end = payload.index(b"\r\n", at)
        size = int(payload[at:end].split(b";")[0], 16)
        if size == 0:
            return bytes(out)
        out += payload[end + 2 : end + 2 + size]
        at = end + 2 + size + 2


async def _post(port: int, path: str, body: dict) -> tuple[int, dict[str, str], bytes]:
    """One POST on a connection of its own, answered whole (Connection: close). A bare HTTP/1.1 client: eighty
    httpx requests at once cost the test process as much CPU as the server spends refusing them, on the same cores."""
    data = json.dumps(body).encode()
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n").encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head + data)
        answer = await reader.read()  # to the end: the server closes the connection after its answer
    finally:
        writer.close()
    top, _, payload = answer.partition(b"\r\n\r\n")
    lines = top.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    if headers.get("transfer-encoding") == "chunked":
        payload = _unchunk(payload)
    return int(lines[0].split()[1]), headers, payload


async def _send(port: int, kind: str, prompt: str) -> Outcome:
    path, body = _request(kind, prompt, NEW)
    started = time.perf_counter()
    status, headers, payload = await _post(port, path, body)
    out = Outcome(kind, prompt, status, time.perf_counter() - started, headers, None)
    if status == 200 and kind == "stream":
        events = _events(payload.decode())
        assert events and "error" not in events[-1], events[-1:]
        out.body, out.text = events, events[-1]["generated_text"]
        return out
    out.body = json.loads(payload)
    if status == 200:
        out.text = out.body["choices"][0]["text"] if kind == "completions" else out.body["generated_text"]
    return out


async def _alone(http: httpx.AsyncClient, kind: str, prompt: str) -> str:
    """The same request alone, through httpx: its generated text."""
    path, body = _request(kind, prompt, NEW)
    if kind == "stream":
        async with http.stream("POST", path, json=body) as r:
            assert r.status_code == 200
            return _events((await r.aread()).decode())[-1]["generated_text"]
    r = await http.post(path, json=body)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"] if kind == "completions" else r.json()["generated_text"]


async def _metrics(http: httpx.AsyncClient) -> dict[str, float]:
    text = (await http.get("/metrics")).text
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^(prompt_server_engine_\w+) (\S+)$", text, re.MULTILINE)}


async def _until(http: httpx.AsyncClient, condition, timeout: float = 30.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        stats = await _metrics(http)
        if condition(stats) or time.monotonic() > deadline:
            return stats
        await asyncio.sleep(0.01)


def _running(stats):
    return stats["prompt_server_engine_running"]


def _queued(stats):
    return stats["prompt_server_engine_queue_depth"]


async def _open_stream(stack: contextlib.AsyncExitStack, url: str, kind: str, prompt: str):
    """A long stream, read up to its first event (it is running, or queued when its status line is all there is)."""
    http = await stack.enter_async_context(httpx.AsyncClient(base_url=url, timeout=60))
    path, body = _request(kind, prompt, HOLD, hold=True, stream=True)
    r = await stack.enter_async_context(http.stream("POST", path, json=body))
    assert r.status_code == 200
    return r


@contextlib.contextmanager
def _quiet_collector():
    """No full garbage collection in this process while it times answers: with torch and transformers loaded one
    stalls its event loop for a good part of a second, which the server would be charged with."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


async def _burst(url: str) -> tuple[list[Outcome], bool]:
    """Fill the batch with MAX_BATCH long streams, fire BURST requests at once, then let the long streams go.
    -> (outcomes, whether the batch stayed full until the refusals were in)."""
    port = int(url.rsplit(":", 1)[1])
    async with contextlib.AsyncExitStack() as blockers, httpx.AsyncClient(base_url=url, timeout=60) as http:
        streams = [await _open_stream(blockers, url, "stream", PROMPTS[i]) for i in range(MAX_BATCH)]
        lines = [r.aiter_lines() for r in streams]  # kept: a line iterator dropped closes its stream
        for it in lines:
            await it.__anext__()  # the first event: generating
        stats = await _until(http, lambda s: _running(s) == MAX_BATCH)
        assert _running(stats) == MAX_BATCH and _queued(stats) == 0, stats

        tasks = [asyncio.create_task(_send(port, KINDS[i % 3], PROMPTS[i % len(PROMPTS)])) for i in range(BURST)]
        deadline = time.monotonic() + 30
        while sum(t.done() for t in tasks) < BURST - MAX_QUEUE and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        stats = await _metrics(http)
        held = _running(stats) == MAX_BATCH and _queued(stats) == MAX_QUEUE
        await blockers.aclose()  # the long streams' clients leave: their rows go, the queue is admitted
        return list(await asyncio.gather(*tasks)), held


async def _alone_all(url: str, outcomes: list[Outcome]) -> list[str]:
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        return [await _alone(http, o.kind, o.prompt) for o in outcomes]


def test_burst_gets_fast_429s_and_accepted_requests_complete(live):
    url, _ = live
    with _quiet_collector():
        outcomes, held = asyncio.run(_burst(url))
    assert len(outcomes) == BURST
    assert {o.status for o in outcomes} <= {200, 429}, [(o.status, o.body) for o in outcomes if o.status != 429]
    refused = [o for o in outcomes if o.status == 429]
    accepted = [o for o in outcomes if o.status == 200]
    if held:  # the batch was full throughout: exactly the queue's places were taken
        assert len(accepted) == MAX_QUEUE and len(refused) == BURST - MAX_QUEUE
    assert len(accepted) >= MAX_QUEUE and refused, (len(accepted), len(refused))

    for o in refused:
        assert int(o.headers["retry-after"]) >= 1, o.headers
        assert isinstance(o.body, dict) and set(o.body) == {"error", "error_type"}, o.body
        assert o.body["error_type"] == "overloaded" and "queue is full" in o.body["error"], o.body
    times = [o.seconds for o in refused]
    p50, p99 = _quantile(times, 0.50), _quantile(times, 0.99)
    assert p99 < REFUSAL_P99, (p50, sorted(times)[-5:])

    for burst, alone in zip(accepted, asyncio.run(_alone_all(url, accepted))):
        assert burst.text == alone and burst.text, (burst.kind, burst.prompt, burst.text, alone)
    assert httpx.get(f"{url}/health", timeout=10).status_code == 200
    stats = asyncio.run(_drained(url))
    assert _running(stats) == 0 and _queued(stats) == 0, stats
    kinds = {k: sum(o.kind == k for o in accepted) for k in KINDS}
    print(f"\noverload: {BURST} concurrent requests (max_queue {MAX_QUEUE}, max_batch_size {MAX_BATCH}, batch held "
          f"full by {MAX_BATCH} long streams: {held}): {len(accepted)} accepted ({kinds}), all equal to the same "
          f"request alone; {len(refused)} refused with 429 + Retry-After in p50 {p50 * 1000:.0f} ms, "
          f"p99 {p99 * 1000:.0f} ms, max {max(times) * 1000:.0f} ms")


async def _drained(url: str) -> dict[str, float]:
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        return await _until(http, lambda s: _running(s) == 0 and _queued(s) == 0)


async def _leave(url: str) -> dict[str, float]:
    """Long requests of every kind run (the batch full) or wait (two queued); then their clients leave at once."""
    async with contextlib.AsyncExitStack() as stack, httpx.AsyncClient(base_url=url, timeout=60) as metrics:
        streams = [await _open_stream(stack, url, kind, PROMPTS[0]) for kind in ("stream", "completions")]
        plain_clients = [await stack.enter_async_context(httpx.AsyncClient(base_url=url, timeout=60))
                         for _ in range(MAX_BATCH)]

        async def plain(i: int, kind: str):
            path, body = _request(kind, PROMPTS[1], HOLD, hold=True)
            return await plain_clients[i].post(path, json=body)

        tasks = [asyncio.create_task(plain(i, kind)) for i, kind in enumerate(("generate", "completions"))]
        stats = await _until(metrics, lambda s: _running(s) == MAX_BATCH)
        assert _running(stats) == MAX_BATCH, stats
        # two more wait in the queue: a stream and a plain request
        streams.append(await _open_stream(stack, url, "stream", PROMPTS[2]))
        tasks.append(asyncio.create_task(plain(2, "generate")))
        stats = await _until(metrics, lambda s: _queued(s) == 2)
        assert _running(stats) == MAX_BATCH and _queued(stats) == 2, stats
        for t in tasks:
            assert not t.done()

        before = await _metrics(metrics)
        left = time.perf_counter()
        for t in tasks:
            t.cancel()
        await stack.aclose()  # every client closes its connection
        after = await _until(metrics, lambda s: _running(s) == 0 and _queued(s) == 0, timeout=10)
        freed = time.perf_counter() - left
        await asyncio.sleep(0.3)
        idle = await _metrics(metrics)
        return {"before": before, "after": after, "idle": idle, "freed": freed}


def test_clients_that_leave_free_their_rows_and_cache(live):
    url, _ = live
    got = asyncio.run(_leave(url))
    before, after, idle = got["before"], got["after"], got["idle"]
    assert _running(after) == 0 and _queued(after) == 0, after
    steps = after["prompt_server_engine_steps_total"] - before["prompt_server_engine_steps_total"]
    tokens = after["prompt_server_engine_generated_tokens_total"] - before["prompt_server_engine_generated_tokens_total"]
    # no row ran on: left alone they had MAX_BATCH x (HOLD - what they had made) tokens to go
    assert tokens < HOLD, (steps, tokens)
    # the engine is idle: no step ran since (no rows, no batch, so no cache is held for them)
    assert idle["prompt_server_engine_steps_total"] == after["prompt_server_engine_steps_total"], (after, idle)
    assert idle["prompt_server_engine_generated_tokens_total"] == after["prompt_server_engine_generated_tokens_total"]
    # none of them finished of its own: all six were cancelled
    assert after["prompt_server_engine_finished_total"] == before["prompt_server_engine_finished_total"]
    # and it serves again at once
    r = httpx.post(f"{url}/generate", json={"inputs": PROMPTS[0], "parameters": {"max_new_tokens": 4}}, timeout=30)
    assert r.status_code == 200, r.text
    print(f"\ndisconnects: {MAX_BATCH} running rows (2 streams, 2 plain requests) and 2 queued requests whose clients "
          f"left were all gone {got['freed'] * 1000:.0f} ms later, after {steps:.0f} engine steps "
          f"({tokens:.0f} tokens); the engine then idle, its batch (and cache) released")

