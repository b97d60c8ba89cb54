"""Threads by name: a thread named here passes its name on to the threads it starts (Linux copies a thread's name
into each thread it creates), so a test can tell a thread's own OpenMP workers from threads the rest of the
process starts meanwhile (an idle engine's next pool, a client's worker)."""

from __future__ import annotations

import itertools
import os
import threading
import time

_serial = itertools.count()


def name_this_thread(prefix: str) -> str:
    """Give the calling thread a name no other thread has (at most 15 characters); -> the name."""
    name = f"{prefix[:9]}-{next(_serial) % 100000}"
    with open(f"/proc/self/task/{threading.get_native_id()}/comm", "w") as f:
        f.write(name)
    return name


def named(name: str) -> set[str]:
    """The ids of the process's threads called `name`."""
    found = set()
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                if f.read().strip() == name:
                    found.add(tid)
        except FileNotFoundError:  # ended meanwhile
            pass
    return found


def mine() -> set[str]:
    """The calling thread and every thread named as it is (those it started after it was named)."""
    with open(f"/proc/self/task/{threading.get_native_id()}/comm") as f:
        return named(f.read().strip())


def mine_within(allowed: set[str], timeout: float = 5.0) -> set[str]:
    """`mine()` once it holds no thread outside `allowed`, or as it is after `timeout` seconds. libgomp's freed
    workers leave its barrier, then exit on their own (detached, never joined), so a pool just released can still
    be listed for a moment after the call that freed it has returned."""
    deadline = time.monotonic() + timeout
    while (threads := mine()) - allowed and time.monotonic() < deadline:
        time.sleep(0.01)
    return threads
