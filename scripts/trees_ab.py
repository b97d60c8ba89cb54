"""Source trees of prompt-server side by side over HTTP, interleaved point by point (bench_http.interleaved): each
tree serves 64 adapters of 20 virtual tokens (the five kinds mixed) and no adapter, and every series of every tree
is measured at each point in turn, the order reversed at every other point and round.

    git worktree add /tmp/ps-a00acb6 a00acb6
    .venv/bin/python scripts/trees_ab.py old=/tmp/ps-a00acb6 new=. --rounds 3 --endpoints completions,chat

Each argument is LABEL=TREE: a source tree of prompt-server, served with this interpreter (the tree first on the
path). Prints each series' tokens/s pooled and per round, time to first token p50, inter-token latency p50 and
p99 and its cache counters; then each server's full passes of Python's cycle collector during the run (read from
/metrics where the tree exports python_gc_collections_total).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prompt_server.model.loader import load_model
from prompt_server_bench.bench import TOPICS, write_adapters
from prompt_server_bench.bench_http import OURS_IGNORE_EOS, interleaved, pct, prompts_needed
from prompt_server_bench.procs import free_port, stop, wait_healthy

ADAPTERS = 64


def full_collections(url: str) -> float | None:
    """The server's full cycle-collector passes so far (generation 2), or None where /metrics has no such series."""
    found = re.search(r'^python_gc_collections_total\{generation="2"\} (\S+)$', httpx.get(url + "/metrics", timeout=30).text,
                      re.MULTILINE)
    return None if found is None else float(found.group(1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trees", nargs="+", help="LABEL=TREE")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--endpoints", type=lambda t: t.split(","), default=["completions", "chat"])
    parser.add_argument("--clients", type=int, default=32)
    cli = parser.parse_args()
    args = argparse.Namespace(rounds=cli.rounds, endpoints=cli.endpoints, concurrency=[cli.clients], rates=[],
                              ignore_eos=True, requests_per_client=2, open_seconds=16.0, new_tokens=32)
    loaded = load_model(None, device="cpu", dtype="float32")
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as running:
        store = Path(tmp) / "adapters"
        store.mkdir()
        ids = [a for a, _ in write_adapters(loaded.model, store, ADAPTERS, 20, prefix="v20-")]
        runs, servers = [], {}
        for label, tree in (t.split("=", 1) for t in cli.trees):
            url = f"http://127.0.0.1:{(port := free_port())}"
            proc = subprocess.Popen(
                [sys.executable, "-m", "prompt_server.cli", "serve", "--model", str(loaded.path), "--adapters",
                 str(store), "--port", str(port), "--max-batch-size", str(max(cli.clients, 8)), "--max-queue",
                 "4096", "--max-virtual-tokens", "128"],
                cwd=tree, env={**os.environ, "PYTHONPATH": str(Path(tree).resolve()), "HF_HUB_OFFLINE": "1"},
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            running.callback(stop, proc)
            wait_healthy(url, proc, timeout=600)
            servers[url] = label
            base = httpx.get(url + "/v1/models", timeout=30).json()["data"][0]["id"]
            runs += [(url, f"{label}, 20-token adapters", ids, OURS_IGNORE_EOS),
                     (url, f"{label}, no adapter", [base], OURS_IGNORE_EOS)]
        prompts = [f"Tell me a long story about {TOPICS[i % len(TOPICS)]}, in many sentences ({i})."
                   for i in range(prompts_needed(args, ADAPTERS))]
        passes = {url: full_collections(url) for url in servers}
        for p in interleaved(runs, prompts, args):
            print(f"{p.series} | {p.endpoint}: {p.rate:.1f} tok/s (rounds "
                  f"{', '.join(f'{r:.1f}' for r in p.round_rates)}), TTFT p50 {statistics.median(p.ttfts):.2f} s, "
                  f"ITL p50 {pct(p.itls, 0.5) * 1e3:.0f} ms p99 {pct(p.itls, 0.99) * 1e3:.0f} ms, "
                  + ", ".join(f"{k} {v:g}" for k, v in p.server.items()))
        for url, label in servers.items():
            before, after = passes[url], full_collections(url)
            print(f"{label}: full collector passes during the run: "
                  f"{'not exported' if before is None or after is None else f'{after - before:g}'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
