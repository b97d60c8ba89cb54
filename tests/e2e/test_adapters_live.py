"""Adapters on a live server: push with the CLI and generate at once; replace and delete while requests run;
an abandoned stream stops generating."""

from __future__ import annotations

import json
import re
import time

import httpx

from prompt_server.cli import main as cli
from prompt_server.client import AdminClient
from tests.api.oracle import peft_greedy, saved_peft

PROMPT = "Once upon a time"
N = 10
LONG = 300  # tokens an in-flight request generates while the adapter changes under it


def _tokens(server, adapter_id, n=N):
    body = {"inputs": PROMPT, "parameters": {"adapter_id": adapter_id, "max_new_tokens": n, "details": True}}
    r = httpx.post(f"{server}/generate", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return [t["id"] for t in r.json()["details"]["tokens"]], r.json()["details"]


def _open_stream(http, adapter_id):
    body = {"inputs": PROMPT, "parameters": {"adapter_id": adapter_id, "max_new_tokens": LONG,
                                             "ignore_eos_token": True, "details": True}}
    return http.stream("POST", "/generate_stream", json=body)


def _events(lines):
    for line in lines:
        if line.startswith("data:"):
            yield json.loads(line[5:])


def test_cli_push_then_generate_at_once(server, tiny_llama_dir, tmp_path, capsys):
    peft, adapter_dir = saved_peft(tiny_llama_dir, "prefix_projection", tmp_path / "pp", seed=21)
    assert cli(["adapters", "push", "pp", str(adapter_dir), "--url", server]) == 0
    assert "created pp version 1" in capsys.readouterr().out
    assert _tokens(server, "pp")[0] == peft_greedy(peft, tiny_llama_dir, PROMPT, N)
    assert cli(["adapters", "list", "--url", server]) == 0
    assert re.search(r"^pp\tPREFIX_TUNING\tv1\t", capsys.readouterr().out, re.MULTILINE)
    assert cli(["adapters", "rm", "pp", "--url", server]) == 0
    assert cli(["adapters", "rm", "pp", "--url", server]) == 1
    assert "HTTP 404" in capsys.readouterr().err


def test_replace_and_delete_while_requests_run(server, tiny_llama_dir, tmp_path):
    peft1, dir1 = saved_peft(tiny_llama_dir, "prompt_tuning", tmp_path / "v1", seed=31)
    peft2, dir2 = saved_peft(tiny_llama_dir, "prompt_tuning", tmp_path / "v2", seed=32)
    expected1 = peft_greedy(peft1, tiny_llama_dir, PROMPT, N)
    expected2 = peft_greedy(peft2, tiny_llama_dir, PROMPT, N)
    assert expected1 != expected2
    with AdminClient(server) as admin, httpx.Client(base_url=server, timeout=120) as http:
        record, created = admin.push("live", dir1)
        assert created and record["version"] == 1

        with _open_stream(http, "live") as running:
            events = _events(running.iter_lines())
            first = next(events)  # submitted (version 1 pinned) and generating
            record, created = admin.push("live", dir2)
            assert not created and record["version"] == 2
            assert _metric(server, "prompt_server_engine_running") == 1  # the first request is still generating
            tokens, details = _tokens(server, "live")
            assert tokens == expected2 and details["adapter_version"] == 2
            rest = list(events)
        streamed = [first["token"]["id"]] + [e["token"]["id"] for e in rest]
        assert len(streamed) == LONG  # the old version served the whole request
        assert streamed[: len(expected1)] == expected1

        with _open_stream(http, "live") as running:
            events = _events(running.iter_lines())
            first = next(events)
            admin.remove("live")
            assert _metric(server, "prompt_server_engine_running") == 1
            assert http.post("/generate", json={"inputs": PROMPT, "parameters": {"adapter_id": "live"}}
                             ).status_code == 404
            rest = list(events)
        assert rest[-1]["details"]["finish_reason"] == "length"
        assert [first["token"]["id"]] + [e["token"]["id"] for e in rest][: N - 1] == expected2


def _metric(server, name):
    text = httpx.get(f"{server}/metrics").text
    return float(re.search(rf"^{name} (\S+)$", text, re.MULTILINE).group(1))


def _assert_cancelled(server, before, budget):
    deadline = time.monotonic() + 30
    while _metric(server, "prompt_server_engine_running") > 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _metric(server, "prompt_server_engine_running") == 0
    assert _metric(server, "prompt_server_engine_generated_tokens_total") - before < budget


def test_abandoned_stream_is_cancelled(server):
    before = _metric(server, "prompt_server_engine_generated_tokens_total")
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 480, "ignore_eos_token": True}}
    with httpx.Client(timeout=60) as http, http.stream("POST", f"{server}/generate_stream", json=body) as r:
        next(r.iter_lines())
    _assert_cancelled(server, before, 480)


def test_abandoned_request_is_cancelled(server):
    before = _metric(server, "prompt_server_engine_generated_tokens_total")
    body = {"prompt": PROMPT, "max_tokens": 480, "ignore_eos": True}
    with httpx.Client() as http:
        try:
            http.post(f"{server}/v1/completions", json=body, timeout=0.3)
        except httpx.TimeoutException:
            pass
        else:
            raise AssertionError("480 tokens came back within 0.3 s: the test cannot tell cancelling apart")
    _assert_cancelled(server, before, 480)
