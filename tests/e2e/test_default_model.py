"""The real default model over HTTP (slow): `serve` without --model, an uploaded adapter generates like PEFT."""

from __future__ import annotations

import httpx
import openai
import pytest

from prompt_server.client import AdminClient
from tests.api.oracle import peft_greedy, saved_peft
from tests.e2e.server import run_server

pytestmark = pytest.mark.slow

PROMPT = "The capital of France is"


def test_default_model_serves_adapters_like_peft(default_model_dir, tmp_path):
    cache_dir = default_model_dir.parents[1]  # <cache>/models/<name>
    peft, adapter_dir = saved_peft(default_model_dir, "prefix", tmp_path / "prefix", seed=3)
    expected = peft_greedy(peft, default_model_dir, PROMPT, 8)
    with run_server(None, tmp_path / "store", tmp_path / "server.log", "--cache-dir", str(cache_dir)) as url:
        info = httpx.get(f"{url}/info").json()
        assert info["model_id"] == default_model_dir.name
        with AdminClient(url) as admin:
            admin.push("capitals", adapter_dir)
        body = {"inputs": PROMPT, "parameters": {"adapter_id": "capitals", "max_new_tokens": 8, "details": True}}
        details = httpx.post(f"{url}/generate", json=body, timeout=120).json()["details"]
        assert [t["id"] for t in details["tokens"]] == expected

        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        chat = client.chat.completions.create(
            model=info["model_id"], max_tokens=16, temperature=0,
            messages=[{"role": "user", "content": "What is the capital of France?"}],
        )
        assert "Paris" in chat.choices[0].message.content
