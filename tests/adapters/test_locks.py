"""The two inter-process locks (filelock.FileLock): the adapter store's and the default model cache's."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from filelock import FileLock, Timeout

from prompt_server.adapters.store import AdapterStore
from prompt_server.model.default import _locked

# Another process that takes an exclusive flock on a path, says so, and holds it for a while.
HOLDER = """
import fcntl, sys, time
with open(sys.argv[1], "a+") as fh:
    fcntl.flock(fh, fcntl.LOCK_EX)
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def _hold_elsewhere(path: Path, seconds: float) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(path), str(seconds)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def _taken_elsewhere(path: Path) -> bool:
    code = "import fcntl, sys\nfh = open(sys.argv[1], 'a+')\ntry:\n    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)\n" \
           "except BlockingIOError:\n    sys.exit(3)\n"
    return subprocess.run([sys.executable, "-c", code, str(path)], check=False).returncode == 3


def test_store_lock_excludes_other_processes_and_threads(tmp_path):
    store = AdapterStore(tmp_path)
    with store.locked():
        assert (tmp_path / ".lock").exists()
        assert _taken_elsewhere(tmp_path / ".lock")
        got: list[str] = []

        def other_thread() -> None:
            try:
                FileLock(tmp_path / ".lock").acquire(timeout=0.1)
                got.append("acquired")
            except Timeout:
                got.append("waited")

        t = threading.Thread(target=other_thread)
        t.start()
        t.join()
        assert got == ["waited"]
    assert not _taken_elsewhere(tmp_path / ".lock")
    assert (tmp_path / ".lock").exists()  # the same path, kept for the next holder


def test_store_lock_waits_for_another_process(tmp_path):
    store = AdapterStore(tmp_path)
    holder = _hold_elsewhere(tmp_path / ".lock", 0.5)
    started = time.monotonic()
    with store.locked():
        assert time.monotonic() - started > 0.2
    holder.wait(timeout=10)


def test_default_model_lock_says_it_waits(tmp_path, capsys):
    lock = tmp_path / ".model.lock"
    with _locked(lock, progress=True):
        assert _taken_elsewhere(lock)
    assert capsys.readouterr().err == ""  # free: taken at once, nothing said
    holder = _hold_elsewhere(lock, 0.5)
    started = time.monotonic()
    with _locked(lock, progress=True):
        waited = time.monotonic() - started
        assert _taken_elsewhere(lock)
    holder.wait(timeout=10)
    assert waited > 0.2
    assert "waiting for another process that is preparing the default model" in capsys.readouterr().err
    with _locked(lock, progress=False):  # released: taken again at once
        pass


@pytest.mark.parametrize("progress", [True, False])
def test_default_model_lock_is_released_on_error(tmp_path, progress):
    lock = tmp_path / ".model.lock"
    with pytest.raises(RuntimeError), _locked(lock, progress):
        raise RuntimeError("build failed")
    assert not _taken_elsewhere(lock)
