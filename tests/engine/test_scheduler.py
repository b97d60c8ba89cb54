"""The scheduler alone: exactly which rows a step prefills, in what chunks, and what waits, under its limits."""

from __future__ import annotations

import asyncio
import collections

import pytest

from prompt_server.config import Settings
from prompt_server.engine.scheduler import MIN_CHUNK, Scheduler
from prompt_server.engine.sequence import Detokenizer, RequestHandle, Sequence
from prompt_server.engine.types import GenerateRequest
from prompt_server.model.sampling import RowSampler


@pytest.fixture
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def seq(loop, prompt_len: int, new: int = 8, *, logprobs: bool = False, deadline: float = 1e18) -> Sequence:
    req = GenerateRequest(prompt="x", max_new_tokens=new, prefill_logprobs=logprobs)
    return Sequence(handle=RequestHandle(loop, lambda: None), request=req,
                    prompt_ids=list(range(1, prompt_len + 1)), adapter=None,
                    sampler=RowSampler.create(req.sampling, "cpu"), eos_ids=frozenset(), detok=Detokenizer(None),
                    special_ids=frozenset(), max_position=1 << 20, deadline=deadline)


def plan(settings, running=(), width=0, prefilling=(), waiting=(), now=0.0):
    queue = collections.deque(waiting)
    out = Scheduler(settings).plan(list(running), width, list(prefilling), queue, now)
    return out, queue


def test_newcomers_fill_the_step_budget_and_the_last_one_is_chunked(loop):
    a, b, c = seq(loop, 30), seq(loop, 40), seq(loop, 50)
    out, queue = plan(Settings(max_step_tokens=64), waiting=[a, b, c])
    assert out.prefill == [a, b] and [s.chunk for s in out.prefill] == [30, 34]
    assert list(queue) == [c]  # nothing left of the budget: it waits for the next step


def test_running_rows_take_one_token_each_and_prefilling_rows_go_first(loop):
    running = [seq(loop, 5) for _ in range(10)]
    mid = seq(loop, 100)
    mid.prefilled = 70
    new, later = seq(loop, 40), seq(loop, 40)
    out, queue = plan(Settings(max_step_tokens=64), running=running, width=13, prefilling=[mid],
                      waiting=[new, later])
    # 64 - 10 running = 54: the row mid-prefill takes its last 30, the newcomer 24 of its 40, the next waits
    assert out.prefill == [mid, new] and (mid.chunk, new.chunk) == (30, 24)
    assert list(queue) == [later]


def test_a_full_step_still_gives_a_minimum_chunk_and_admits_nobody_new(loop):
    running = [seq(loop, 5) for _ in range(30)]
    mid, new = seq(loop, 100), seq(loop, 8)
    out, queue = plan(Settings(max_step_tokens=32, max_batch_size=64), running=running, width=13,
                      prefilling=[mid], waiting=[new])
    assert out.prefill == [mid] and mid.chunk == MIN_CHUNK
    assert list(queue) == [new]  # waits: the budget is spent


def test_requests_for_prompt_logprobs_are_taken_whole_or_wait(loop):
    first, whole = seq(loop, 10), seq(loop, 100, logprobs=True)
    out, queue = plan(Settings(max_step_tokens=64), waiting=[first, whole])
    assert out.prefill == [first] and list(queue) == [whole]
    out, queue = plan(Settings(max_step_tokens=64), waiting=[whole])
    assert out.prefill == [whole] and whole.chunk == 100  # alone, it goes whatever its size


def test_batch_size_and_memory_limits_hold_newcomers_back(loop):
    running = [seq(loop, 10, new=100) for _ in range(3)]
    waiting = [seq(loop, 10, new=100) for _ in range(3)]
    out, queue = plan(Settings(max_batch_size=4), running=running, width=10, waiting=waiting)
    assert out.prefill == waiting[:1] and len(queue) == 2
    # 5 rows x (10 + 100) = 550 > 500: only one more fits
    out, queue = plan(Settings(max_batch_tokens=500), running=running, width=10, waiting=waiting)
    assert out.prefill == waiting[:1] and len(queue) == 2


def test_cancelled_and_expired_requests_leave_the_queue(loop):
    gone, late, ok = seq(loop, 5), seq(loop, 5, deadline=1.0), seq(loop, 5)
    gone.handle.cancelled = True
    out, queue = plan(Settings(), waiting=[gone, late, ok], now=2.0)
    assert out.expired == [(gone, "cancelled"), (late, "timeout")]
    assert out.prefill == [ok] and not queue
