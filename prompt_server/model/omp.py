"""OpenMP worker pools of the threads other than the engine's.

libgomp, the OpenMP runtime of torch's Linux builds, gives every thread that starts a parallel region a pool of
workers of its own, kept until that thread ends. Once the process holds more OpenMP threads than it has CPUs, every
worker spins only a few hundred times before it sleeps (libgomp's "throttled" spin count), and a step's many parallel
regions each wait for sleeping workers to wake. The engine steps on a thread of its own, after the model was loaded
and warmed up on another, so that other thread's idle pool alone puts the engine's workers to sleep between regions:
200 products of 32 rows took 120-138 ms on a second thread after the first had run torch, 99-101 ms once the first
thread's pool was released, 82-98 ms on the first thread alone (AVX2 EPYC, 2 cores; scripts/omp_release_ab.py
measures the engine with and without).

`release()` frees the calling thread's pool (OpenMP 5.0's omp_pause_resource_all); torch starts a new one if that
thread runs a parallel op again. Where the runtime is not libgomp (macOS, Intel OpenMP builds) it does nothing.
"""

from __future__ import annotations

import ctypes
import functools
import logging
from collections.abc import Callable
from typing import Any, TypeVar

log = logging.getLogger(__name__)

OMP_PAUSE_SOFT = 1
T = TypeVar("T")


@functools.cache
def _libgomp() -> Any | None:
    """The libgomp this process has loaded (torch's own copy), or None."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "libgomp" in line and line.rstrip().endswith(".so.1")}
    except OSError:
        return None
    for path in sorted(paths):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        if hasattr(lib, "omp_pause_resource_all"):
            lib.omp_pause_resource_all.argtypes = [ctypes.c_int]
            lib.omp_pause_resource_all.restype = ctypes.c_int
            return lib
    return None


def release() -> bool:
    """Free the calling thread's OpenMP workers; True if libgomp did. Call it outside any parallel region, on a
    thread that is done with torch for now. Imports torch (which loads libgomp) only here: the HTTP layer, which
    wraps its worker threads' calls in `released`, does not import torch."""
    import torch  # noqa: F401

    lib = _libgomp()
    if lib is None:
        return False
    ok = lib.omp_pause_resource_all(OMP_PAUSE_SOFT) == 0
    if not ok:
        log.debug("omp_pause_resource_all failed; the thread's OpenMP workers stay")
    return ok


def released(fn: Callable[..., T]) -> Callable[..., T]:
    """`fn`, then `release()` on the thread that ran it: for torch work on worker threads other than the engine's
    (an adapter upload collapsing its encoder), so their pools do not outlive it."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> T:
        try:
            return fn(*args, **kwargs)
        finally:
            release()

    return run
