"""Start and stop real `prompt-server serve` processes (uvicorn) on free ports of 127.0.0.1."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from prompt_server_bench.procs import free_port, stop, wait_healthy

__all__ = ["free_port", "run_server", "run_server_process", "stop", "wait_healthy"]

REPO = Path(__file__).resolve().parents[2]


@contextmanager
def run_server(model_dir: Path | None, store: Path, log: Path, *extra: str) -> Iterator[str]:
    """A server process for `model_dir` (None: the embedded default) with adapter store `store`; yields its URL."""
    with run_server_process(model_dir, store, log, *extra) as (url, _):
        yield url


@contextmanager
def run_server_process(model_dir: Path | None, store: Path, log: Path,
                       *extra: str) -> Iterator[tuple[str, subprocess.Popen]]:
    """As run_server; yields (URL, the process)."""
    port = free_port()
    model = [] if model_dir is None else ["--model", str(model_dir)]
    cmd = [sys.executable, "-m", "prompt_server.cli", "serve", *model, "--adapters", str(store),
           "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning", *extra]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, log)
        yield url, proc
    finally:
        stop(proc)
