"""The scheduler alone: exactly which rows a step prefills, in what chunks, and what waits, under its limits."""

from __future__ import annotations

import asyncio
import collections

import pytest
import torch

from prompt_server.adapters.types import PREFIX_TUNING, PROMPT_TUNING, SoftPrompt
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


def seq(loop, prompt_len: int, new: int = 8, *, logprobs: bool = False, deadline: float = 1e18,
        adapter: SoftPrompt | None = None) -> Sequence:
    req = GenerateRequest(prompt="x", max_new_tokens=new, prefill_logprobs=logprobs)
    return Sequence(handle=RequestHandle(loop, lambda: None), request=req,
                    prompt_ids=list(range(1, prompt_len + 1)), adapter=adapter,
                    sampler=RowSampler.create(req.sampling, "cpu"), eos_ids=frozenset(), detok=Detokenizer(None),
                    special_ids=frozenset(), max_position=1 << 20, deadline=deadline)


def soft(adapter_id: str, v: int, version: int = 1, *, prefix: bool = False) -> SoftPrompt:
    """An adapter of `v` virtual tokens (hidden size 8) or a prefix of `v` columns."""
    return SoftPrompt(id=adapter_id, version=version, peft_type=PREFIX_TUNING if prefix else PROMPT_TUNING,
                      task_type="CAUSAL_LM", num_virtual_tokens=v, sha256=f"{adapter_id}-{version}", size_bytes=0,
                      created_at=0.0, virtual_tokens=None if prefix else torch.zeros(v, 8),
                      prefix=torch.zeros(1, 2, 1, v, 4) if prefix else None)


def plan(settings, running=(), width=0, prefilling=(), waiting=(), now=0.0, soft_cached=None):
    queue = collections.deque(waiting)
    out = Scheduler(settings, soft_cached).plan(list(running), width, list(prefilling), queue, now)
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


def test_uncached_virtual_tokens_count_against_the_step_budget_once_per_adapter_version(loop):
    cold, cold_v2, warm, prefix = soft("cold", 100), soft("cold", 100, version=2), soft("warm", 100), \
        soft("prefix", 100, prefix=True)
    cached = {("warm", 1, "warm-1")}

    def soft_cached(a):
        return (a.id, a.version, a.sha256) in cached

    # 256 tokens: cold's 100 virtual tokens + 10, its second row 10 (computed once), warm's and the prefix's rows
    # 10 each (their keys/values are there already), then version 2 of cold needs 110 of the 116 left: it fits
    rows = [seq(loop, 10, adapter=a) for a in (cold, cold, warm, prefix, cold_v2)]
    out, queue = plan(Settings(max_step_tokens=256), waiting=rows, soft_cached=soft_cached)
    assert out.prefill == rows and [s.chunk for s in out.prefill] == [10] * 5 and not queue
    # with 200 tokens, version 2 (110) does not fit the 70 left, and waits with everything behind it
    later = seq(loop, 10)
    rows = [seq(loop, 10, adapter=a) for a in (cold, cold, warm, prefix, cold_v2)] + [later]
    out, queue = plan(Settings(max_step_tokens=200), waiting=rows, soft_cached=soft_cached)
    assert out.prefill == rows[:4] and list(queue) == rows[4:]


def test_a_newcomer_whose_virtual_tokens_fill_the_step_is_chunked_to_the_rest(loop):
    cold = soft("cold", 100)
    first, second = seq(loop, 40), seq(loop, 40, adapter=cold)
    # 160 tokens: the first 40, then cold's 100 virtual tokens leave the second row 20 of its 40
    out, queue = plan(Settings(max_step_tokens=160), waiting=[first, second], soft_cached=lambda a: False)
    assert out.prefill == [first, second] and (first.chunk, second.chunk) == (40, 20) and not queue
    # alone in the step, a newcomer goes whatever its virtual tokens cost (else it would never go)
    lone = seq(loop, 10, adapter=soft("huge", 1000))
    out, queue = plan(Settings(max_step_tokens=64), waiting=[lone], soft_cached=lambda a: False)
    assert out.prefill == [lone] and lone.chunk == 10
    # without the cache (virtual tokens run inline, in embed_len) nothing extra is counted
    inline = seq(loop, 10, adapter=soft("cold", 100))
    inline.inline_virtual = True
    out, queue = plan(Settings(max_step_tokens=64), waiting=[seq(loop, 10), inline], soft_cached=lambda a: False)
    assert list(queue) == [inline]  # 110 whole: it waits, as before
