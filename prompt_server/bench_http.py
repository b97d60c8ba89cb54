"""HTTP benchmark: concurrent OpenAI-style streaming clients against `prompt-server serve` (every request on a
different adapter) and, in the same run, against `transformers serve --continuous-batching` (no adapter).

    prompt-server bench --http [--clients 32] [--requests 96] [--new-tokens 32]
                        [--transformers-cmd ".venv-bench/bin/transformers"] [--skip-transformers]

The competitor runs the newest transformers with its serving extras; `make bench-http` installs it in a separate
virtual environment, .venv-bench, so that the server's own pinned dependencies stay as they are.

Throughput counts streamed content chunks (one per generated token on both servers) over the wall time of the whole
run; latency is per request, time to first token is the first content chunk.
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from prompt_server.procs import free_port, stop, wait_healthy


@dataclass
class RunStats:
    tokens: int
    wall: float
    latencies: list[float]
    ttfts: list[float]
    errors: int

    @property
    def rate(self) -> float:
        return self.tokens / self.wall if self.wall else 0.0


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


async def _one(client: httpx.AsyncClient, url: str, model: str, prompt: str, new_tokens: int, endpoint: str):
    body = {"model": model, "max_tokens": new_tokens, "stream": True, "temperature": 0}
    if endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    start = time.perf_counter()
    first = None
    tokens = 0
    path = "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"
    async with client.stream("POST", url + path, json=body) as resp:
        if resp.status_code != 200:
            await resp.aread()
            raise RuntimeError(f"{resp.status_code}: {resp.text[:200]}")
        async for line in resp.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            for choice in chunk.get("choices", []):
                if (choice.get("delta") or {}).get("content") or choice.get("text"):
                    tokens += 1
                    if first is None:
                        first = time.perf_counter() - start
    return tokens, time.perf_counter() - start, first


async def drive(url: str, models: list[str], prompts: list[str], clients: int, new_tokens: int,
                endpoint: str = "chat") -> RunStats:
    """`clients` concurrent clients share the request list; each sends its next request when the last one ends."""
    queue: asyncio.Queue = asyncio.Queue()
    for i, p in enumerate(prompts):
        queue.put_nowait((models[i % len(models)], p))
    stats = RunStats(0, 0.0, [], [], 0)

    async def worker(client):
        while not queue.empty():
            model, prompt = queue.get_nowait()
            try:
                tokens, latency, first = await _one(client, url, model, prompt, new_tokens, endpoint)
            except (httpx.HTTPError, RuntimeError, ValueError) as exc:  # counted and reported, the run goes on
                stats.errors += 1
                print(f"request failed: {exc}", file=sys.stderr)
                continue
            stats.tokens += tokens
            stats.latencies.append(latency)
            if first is not None:
                stats.ttfts.append(first)

    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(clients)))
        stats.wall = time.perf_counter() - start
    return stats


def run_http(args, model_dir: Path, write_adapters, prompts: list[str]) -> dict[str, RunStats]:
    """Start both servers one after the other on free ports, drive each with the same clients and prompts."""
    results: dict[str, RunStats] = {}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "adapters"
        store.mkdir()
        adapter_ids = [a for a, _ in write_adapters(store)]
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "prompt_server.cli", "serve", "--model", str(model_dir), "--adapters",
               str(store), "--port", str(port), "--max-batch-size", str(max(args.clients, 1)),
               "--max-queue", str(max(args.requests, 256))]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_healthy(url, proc, timeout=600)
            asyncio.run(drive(url, adapter_ids, prompts[: args.clients], args.clients, 4, args.endpoint))  # warm-up
            results["prompt-server (mixed adapters)"] = asyncio.run(
                drive(url, adapter_ids, prompts, args.clients, args.new_tokens, args.endpoint))
        finally:
            stop(proc)
        if args.skip_transformers:
            return results
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        # `transformers serve [FORCE_MODEL] --continuous-batching`
        cmd = shlex.split(args.transformers_cmd) + [
            "serve", str(model_dir), "--continuous-batching", "--dtype", "float32",
            "--host", "127.0.0.1", "--port", str(port)]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_healthy(url, proc, timeout=600)
            model = str(model_dir)
            asyncio.run(drive(url, [model], prompts[: args.clients], args.clients, 4, args.endpoint))  # warm-up
            results["transformers serve --continuous-batching (no adapter)"] = asyncio.run(
                drive(url, [model], prompts, args.clients, args.new_tokens, args.endpoint))
        finally:
            stop(proc)
    return results


def report(results: dict[str, RunStats], args) -> None:
    path = "/v1/chat/completions" if args.endpoint == "chat" else "/v1/completions"
    print(f"\n{args.clients} concurrent clients, {args.requests} requests x {args.new_tokens} new tokens, "
          f"streamed {path}\n")
    print("| server | tokens/s | p50 latency s | p99 latency s | p50 TTFT s | p99 TTFT s | errors |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, s in results.items():
        print(f"| {name} | {s.rate:.1f} | {statistics.median(s.latencies) if s.latencies else float('nan'):.2f} | "
              f"{pct(s.latencies, 0.99):.2f} | {pct(s.ttfts, 0.5):.2f} | {pct(s.ttfts, 0.99):.2f} | {s.errors} |")
    names = list(results)
    if len(names) == 2 and results[names[1]].rate:
        print(f"\nratio prompt-server / transformers serve = {results[names[0]].rate / results[names[1]].rate:.2f}")
