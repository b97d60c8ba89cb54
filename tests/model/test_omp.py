"""model/omp.py: a thread's OpenMP workers freed once it is done with torch, and torch working as before after."""

from __future__ import annotations

import threading

import pytest
import torch

from prompt_server.model import omp
from tests.threads import mine as _threads  # the thread and its OpenMP workers, named by _on_a_thread
from tests.threads import mine_within, name_this_thread

needs_libgomp = pytest.mark.skipif(omp._libgomp() is None, reason="torch's OpenMP runtime here is not libgomp")
needs_workers = pytest.mark.skipif(torch.get_num_threads() < 2, reason="one torch thread: no OpenMP workers")


def _on_a_thread(fn):
    out: list = []

    def target():
        name_this_thread("omp-test")
        out.append(fn())

    worker = threading.Thread(target=target)
    worker.start()
    worker.join()
    return out[0]


@needs_libgomp
@needs_workers
def test_release_frees_the_calling_threads_workers_and_torch_starts_new_ones():
    a, b = torch.randn(256, 512), torch.randn(512, 256)
    expected = a.double() @ b.double()

    def run():
        before = _threads()
        a @ b  # a parallel region: this thread's pool of workers
        with_pool = _threads()
        freed = omp.release() and omp.release()  # the second time with no workers to free
        after = mine_within(before)
        again = a @ b  # a new pool, the same result
        return before, with_pool, freed, after, _threads(), again

    before, with_pool, freed, after, restarted, again = _on_a_thread(run)
    pool = with_pool - before
    assert freed is True
    assert len(pool) == torch.get_num_threads() - 1  # the workers, beside the thread itself
    assert not pool & after  # gone
    assert len(restarted - after) == len(pool)  # new ones for the next parallel op
    torch.testing.assert_close(again.double(), expected, rtol=1e-5, atol=1e-4)


@needs_libgomp
@needs_workers
def test_released_runs_the_function_then_frees_its_threads_workers_even_when_it_raises():
    a = torch.randn(256, 512)

    def fails():
        a @ a.t()
        raise ValueError("bad upload")

    def run():
        before = _threads()
        value = omp.released(lambda x: (a @ a.t()).shape[0] + x)(1)
        after_ok = mine_within(before)
        with pytest.raises(ValueError, match="bad upload"):
            omp.released(fails)()
        return before, value, after_ok, mine_within(before)

    before, value, after_ok, after_raise = _on_a_thread(run)
    assert value == 257 and not after_ok - before and not after_raise - before


def test_release_is_a_no_op_without_libgomp(monkeypatch):
    monkeypatch.setattr(omp, "_libgomp", lambda: None)
    assert omp.release() is False
    assert omp.released(lambda: 3)() == 3
