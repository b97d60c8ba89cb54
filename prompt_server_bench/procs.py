"""Start-up and shut-down helpers for server processes on 127.0.0.1 (the benchmark's and the tests')."""

from __future__ import annotations

import multiprocessing
import socket
import subprocess
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _exit_code(proc: subprocess.Popen | multiprocessing.Process) -> int | None:
    """The process's exit code, or None while it runs (a subprocess or a multiprocessing child)."""
    if isinstance(proc, subprocess.Popen):
        return proc.poll()
    return None if proc.is_alive() else proc.exitcode


def wait_healthy(url: str, proc: subprocess.Popen | multiprocessing.Process | None, log: Path | None = None,
                 timeout: float = 120.0) -> None:
    """Poll `url`/health until it answers 200; fail early, with the log, if the process exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        code = None if proc is None else _exit_code(proc)
        if code is not None:
            raise RuntimeError(f"server exited with {code}:\n{log.read_text() if log else ''}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} not healthy after {timeout} s:\n{log.read_text() if log else ''}")


def stop(proc: subprocess.Popen) -> None:
    """Terminate, then kill if it does not exit within 30 s."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
