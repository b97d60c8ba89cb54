"""Time to first token at one client over HTTP, builds side by side: chat requests sharing the chat template's
default system prompt, sent by one streaming client to each server in turn, two rounds.

    git worktree add /tmp/ps-8432a13 8432a13
    .venv/bin/python scripts/ttft_ab.py old=/tmp/ps-8432a13 now=. now-compiled=.,PROMPT_SERVER_COMPILE=1

Each argument is LABEL=TREE[,ENV=VALUE...]: a source tree of prompt-server (served with this interpreter, the tree
first on the path) and environment settings for it. Ratios are against the first series.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prompt_server_bench.bench import QUESTIONS
from prompt_server_bench.bench_http import Point, closed_loop, pct
from prompt_server_bench.procs import free_port, stop, wait_healthy

REQUESTS = 24
ROUNDS = 2


def parse(arg: str) -> tuple[str, Path, dict[str, str]]:
    label, rest = arg.split("=", 1)
    tree, *envs = rest.split(",")
    return label, Path(tree).resolve(), dict(e.split("=", 1) for e in envs)


def serve_and_measure(tree: Path, env: dict[str, str], prompts: list[str]) -> list[float]:
    """Start the tree's server on a free port with an empty store, warm it up, -> time to first token per request."""
    with tempfile.TemporaryDirectory() as store:
        url = f"http://127.0.0.1:{(port := free_port())}"
        proc = subprocess.Popen(
            [sys.executable, "-m", "prompt_server.cli", "serve", "--adapters", store, "--port", str(port)],
            cwd=tree, env={**os.environ, "PYTHONPATH": str(tree), "HF_HUB_OFFLINE": "1", **env},
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            wait_healthy(url, proc, timeout=900)  # a compiled server compiles before it answers
            asyncio.run(closed_loop(Point("warm-up", "chat", "closed", 1), url, [""], prompts[:3], 1))
            return asyncio.run(closed_loop(Point("ttft", "chat", "closed", 1), url, [""], prompts, 1)).ttfts
        finally:
            stop(proc)


def main() -> int:
    series = [parse(a) for a in sys.argv[1:]]
    if not series:
        print(__doc__)
        return 2
    prompts = [f"{QUESTIONS[i % len(QUESTIONS)]} ({i})" for i in range(REQUESTS)]
    times: dict[str, list[float]] = {label: [] for label, _, _ in series}
    for round_ in range(ROUNDS):
        for label, tree, env in series:
            got = serve_and_measure(tree, env, prompts)
            times[label] += got
            print(f"{label} round {round_}: p50 {statistics.median(got) * 1000:.1f} ms", flush=True)
    base = statistics.median(times[series[0][0]])
    print(f"\n| series | TTFT p50 | p90 | p50 / {series[0][0]} |\n|---|---:|---:|---:|")
    for label, ts in times.items():
        p50 = statistics.median(ts)
        print(f"| {label} | {p50 * 1000:.1f} ms | {pct(ts, 0.9) * 1000:.1f} ms | {p50 / base:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
