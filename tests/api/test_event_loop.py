"""Nothing blocks the event loop: a slow adapter store or a slow tokenizer delays only the request that waits for it,
never /health nor a stream that is running."""

from __future__ import annotations

import itertools
import threading
import time

import pytest

from tests.api.oracle import upload_parts
from tests.tiny import make_peft, save_peft

SLOW = 1.5  # seconds each slowed call takes
QUICK = 0.5  # what /health may take meanwhile (it takes milliseconds when the loop is free)


@pytest.fixture(scope="module")
def served(serve, tiny_llama_dir, tmp_path_factory):
    with serve() as client:
        pm = make_peft(tiny_llama_dir, "prompt_tuning", seed=3)
        r = client.put("/adapters/slow", files=upload_parts(save_peft(pm, tmp_path_factory.mktemp("a"))))
        assert r.status_code == 201, r.text
        yield client


def _slowed(obj, name: str, seconds: float = SLOW):
    """Make obj.name take `seconds` longer; -> a function that undoes it."""
    original = getattr(obj, name)

    def slow(*args, **kwargs):
        time.sleep(seconds)
        return original(*args, **kwargs)

    setattr(obj, name, slow)
    return lambda: setattr(obj, name, original)


def _while(client, call) -> tuple[float, list[float]]:
    """Run `call(client)` in a thread; meanwhile time /health every 0.1 s. -> (call's time, /health times)."""
    done = threading.Event()
    took: list[float] = []

    def run():
        start = time.monotonic()
        call(client)
        took.append(time.monotonic() - start)
        done.set()

    thread = threading.Thread(target=run)
    thread.start()
    health = []
    while not done.is_set():
        start = time.monotonic()
        assert client.get("/health").status_code == 200
        health.append(time.monotonic() - start)
        time.sleep(0.1)
    thread.join()
    return took[0], health


# route -> (the call, the store method on its path)
ROUTES = {
    "GET /adapters/{id}": (lambda c: c.get("/adapters/slow"), "signature"),
    "GET /adapters": (lambda c: c.get("/adapters"), "ids"),
    "GET /v1/models": (lambda c: c.get("/v1/models"), "ids"),
    "GET /info": (lambda c: c.get("/info"), "ids"),
    "GET /metrics": (lambda c: c.get("/metrics"), "ids"),
    "POST /generate with an adapter": (lambda c: c.post(
        "/generate", json={"inputs": "hello", "parameters": {"max_new_tokens": 2, "adapter_id": "slow"}}), "signature"),
}


@pytest.mark.parametrize("route", list(ROUTES))
def test_a_slow_store_delays_only_the_request_that_reads_it(served, route):
    call, method = ROUTES[route]
    undo = _slowed(served.app.state.service.registry.store, method)
    try:
        took, health = _while(served, call)
    finally:
        undo()
    assert took >= SLOW  # the slowed read was on the request's path
    assert len(health) >= 3 and max(health) < QUICK, health


def test_a_slow_tokenizer_does_not_stall_a_running_stream(served):
    """A stream keeps receiving tokens while another request's prompt takes SLOW seconds to tokenize."""
    engine = served.app.state.service.engine
    arrivals: list[float] = []

    def stream(client):
        body = {"inputs": "Once upon a time", "parameters": {"max_new_tokens": 500, "ignore_eos_token": True}}
        with client.stream("POST", "/generate_stream", json=body) as s:
            arrivals.extend(time.monotonic() for line in s.iter_lines() if line.startswith("data:"))

    # the tiny model decodes its 500 tokens in well under SLOW on a fast machine: steps paced to at least 8 ms each
    # keep the stream running past the slow request
    unpace = _slowed(engine, "_step", 0.008)
    thread = threading.Thread(target=stream, args=(served,))
    thread.start()
    time.sleep(0.2)  # the stream is running
    undo = _slowed(engine, "encode")
    try:
        start = time.monotonic()
        r = served.post("/generate", json={"inputs": "hello there", "parameters": {"max_new_tokens": 2}})
        end = time.monotonic()
    finally:
        undo()
        thread.join()
        unpace()
    assert r.status_code == 200 and end - start >= SLOW
    assert len(arrivals) == 500 and arrivals[-1] > end, "the stream ended before the slow request: nothing shown"
    during = [t for t in arrivals if start <= t <= end]
    gaps = [b - a for a, b in itertools.pairwise(during)]
    assert len(during) > 10 and max(gaps) < QUICK, (len(during), max(gaps, default=None))
