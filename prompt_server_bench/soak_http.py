"""HTTP soak: every kind of traffic against a running server while adapters are uploaded, replaced and deleted.

Clients on 127.0.0.1 send /generate, /generate_stream, /v1/completions, /v1/chat/completions and /classify requests
on random adapters (or none); an admin client meanwhile replaces and deletes some adapters ("churned") and uploads
them again. Requests are counted by route and outcome. Greedy answers on adapters that never change are recorded,
and a sample is sent again alone afterwards: the text must be the same. The server's resident memory is read after
a warm-up and at the end.
"""

from __future__ import annotations

import asyncio
import collections
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

PROMPTS = ["The quick brown fox", "Once upon a time there was a little cat", "Hello world! How are you today?",
           "The weather is good and the sun is shining.", "Question: what is the capital of France? Answer:"]
ROUTES = ("generate", "stream", "completions", "chat", "classify")


@dataclass
class HttpSoakResult:
    outcomes: collections.Counter = field(default_factory=collections.Counter)  # (route, outcome) -> requests
    admin: collections.Counter = field(default_factory=collections.Counter)  # (operation, status) -> count
    checked: int = 0  # recorded greedy answers sent again alone
    mismatched: list = field(default_factory=list)
    rss_start: int = 0
    rss_end: int = 0
    seconds: float = 0.0

    @property
    def requests(self) -> int:
        return sum(self.outcomes.values())

    def summary(self) -> str:
        by_outcome: collections.Counter = collections.Counter()
        for (_, outcome), n in self.outcomes.items():
            by_outcome[outcome] += n
        return (f"{self.requests} requests in {self.seconds:.0f} s ({dict(by_outcome)}), adapter writes "
                f"{dict(collections.Counter({op: n for (op, _), n in self.admin.items()}))}, "
                f"{self.checked} answers re-checked alone ({len(self.mismatched)} differ), resident memory "
                f"{self.rss_start / 2**20:.0f} -> {self.rss_end / 2**20:.0f} MiB")


def _parts(path: Path) -> dict[str, tuple[str, bytes]]:
    return {f.name: (f.name, f.read_bytes()) for f in path.iterdir() if f.is_file() and f.name != "README.md"}


async def _send(client: httpx.AsyncClient, route: str, adapter: str | None, prompt: str, n: int) -> tuple[str, str]:
    """One request -> (outcome, greedy text or "")."""
    if route in ("generate", "stream"):
        body = {"inputs": prompt, "parameters": {"max_new_tokens": n, "adapter_id": adapter, "ignore_eos_token": True}}
        if route == "stream":
            text = ""
            async with client.stream("POST", "/generate_stream", json=body) as r:
                if r.status_code != 200:
                    return str(r.status_code), ""
                async for line in r.aiter_lines():
                    if line.startswith("data:"):
                        event = json.loads(line[5:])
                        if "error" in event:
                            return "stream_error", ""
                        text = event.get("generated_text") or text
            return "ok", text
        r = await client.post("/generate", json=body)
        return ("ok", r.json()["generated_text"]) if r.status_code == 200 else (str(r.status_code), "")
    if route in ("completions", "chat"):
        common = {"model": adapter or "", "max_tokens": n, "temperature": 0, "ignore_eos": True}
        if route == "completions":
            r = await client.post("/v1/completions", json={**common, "prompt": prompt})
            return ("ok", r.json()["choices"][0]["text"]) if r.status_code == 200 else (str(r.status_code), "")
        r = await client.post("/v1/chat/completions", json={**common, "messages": [{"role": "user", "content": prompt}]})
        return ("ok", r.json()["choices"][0]["message"]["content"]) if r.status_code == 200 else (str(r.status_code), "")
    r = await client.post("/classify", json={"inputs": [prompt], "adapter_id": adapter, "labels": ["yes", "no"]})
    return ("ok", "") if r.status_code == 200 else (str(r.status_code), "")


async def _soak(url: str, pid: int, stable: list[str], churned: dict[str, Path], seconds: float, clients: int,
                admin_key: str | None, seed: int, sample: int) -> HttpSoakResult:
    rng = random.Random(seed)
    result = HttpSoakResult()
    recorded: dict[tuple, str] = {}
    adapters = [None, *stable, *churned]
    headers = {"Authorization": f"Bearer {admin_key}"} if admin_key else {}
    limits = httpx.Limits(max_connections=clients + 2)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits, headers=headers) as client:
        for adapter in adapters:  # warm-up: every adapter once, so caches hold what they will hold
            await _send(client, "generate", adapter, PROMPTS[0], 2)
        process = psutil.Process(pid)
        result.rss_start = process.memory_info().rss
        start = time.monotonic()
        deadline = start + seconds

        async def user(i: int) -> None:
            local = random.Random(seed * 1000 + i)
            while time.monotonic() < deadline:
                route, adapter = local.choice(ROUTES), local.choice(adapters)
                prompt, n = local.choice(PROMPTS), local.randint(2, 8)
                try:
                    outcome, text = await _send(client, route, adapter, prompt, n)
                except httpx.HTTPError as exc:
                    outcome, text = f"transport:{type(exc).__name__}", ""
                result.outcomes[(route, outcome)] += 1
                # answers on adapters that never change are kept, to be checked alone afterwards
                if outcome == "ok" and text and route != "classify" and (adapter is None or adapter in stable):
                    recorded[(route, adapter, prompt, n)] = text

        async def admin() -> None:
            while time.monotonic() < deadline:
                adapter_id = rng.choice(list(churned))
                op = rng.choice(("replace", "delete"))
                if op == "replace":
                    r = await client.put(f"/adapters/{adapter_id}", files=_parts(churned[adapter_id]))
                else:
                    r = await client.delete(f"/adapters/{adapter_id}")
                    if r.status_code == 204:  # back again soon: deleted ids come and go
                        await asyncio.sleep(0.2)
                        r2 = await client.put(f"/adapters/{adapter_id}", files=_parts(churned[adapter_id]))
                        result.admin[("upload", r2.status_code)] += 1
                result.admin[(op, r.status_code)] += 1
                await asyncio.sleep(0.1)

        await asyncio.gather(admin(), *(user(i) for i in range(clients)))
        result.seconds = time.monotonic() - start
        result.rss_end = process.memory_info().rss
        for key in rng.sample(sorted(recorded, key=str), min(sample, len(recorded))):
            route, adapter, prompt, n = key
            outcome, text = await _send(client, route, adapter, prompt, n)
            result.checked += 1
            if outcome != "ok" or text != recorded[key]:
                result.mismatched.append((key, recorded[key], text))
    return result


def run_http_soak(url: str, pid: int, stable: list[str], churned: dict[str, Path], seconds: float,
                  clients: int = 8, admin_key: str | None = None, seed: int = 0, sample: int = 40) -> HttpSoakResult:
    """Soak the server at `url` (process `pid`) for `seconds`; `churned` maps adapter ids to the PEFT directory the
    admin client uploads them from (they must be in the store already); `stable` adapters are never written."""
    return asyncio.run(_soak(url, pid, stable, churned, seconds, clients, admin_key, seed, sample))
