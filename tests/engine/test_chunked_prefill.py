"""Chunked prefill under a per-step token budget: the exact chunks a long prompt is cut into, rows decoding beside
it every step, and PEFT's tokens for every adapter kind whatever the chunking."""

from __future__ import annotations

import asyncio

import pytest

from prompt_server.engine.types import GenerateRequest
from prompt_server.model import forward
from prompt_server.model.batch import build_prefill
from tests.engine.conftest import run_engine
from tests.tiny import VARIANTS

LONG = ("Once upon a time there was a little cat who lived in a small house by the river. The weather is good and "
        "the sun is shining. It was a great day, and the movie was wonderful.")
SHORT = "the cat sat on the mat"
BUDGET = 16  # max_step_tokens, the smallest allowed


def greedy(prompt: str, adapter_id: str | None = None, n: int = 6) -> GenerateRequest:
    return GenerateRequest(prompt=prompt, adapter_id=adapter_id, max_new_tokens=n, ignore_eos=True)


@pytest.fixture
def widths(monkeypatch) -> list[int]:
    """Embedding columns of every prefill the engine lays out (its warm-up excluded by the tests)."""
    seen: list[int] = []

    def spy(rows, pad_id, device):
        inputs = build_prefill(rows, pad_id, device)
        seen.append(inputs.ids.shape[1])
        return inputs

    monkeypatch.setattr(forward, "build_prefill", spy)  # a runner's layout of newcomers
    return seen


def test_a_long_prompt_alone_is_cut_into_budget_sized_chunks(llama_world, widths):
    world = llama_world
    n = len(world.loaded.tokenizer(LONG).input_ids)
    assert n > 2 * BUDGET

    async def go(engine):
        widths.clear()
        return await engine.submit(greedy(LONG, "prefix")).result()

    result = run_engine(world, go, max_step_tokens=BUDGET, prefix_cache_bytes=0)
    full, last = divmod(n, BUDGET)
    assert widths == [BUDGET] * full + ([last] if last else [])
    assert [t.id for t in result.tokens] == world.oracle("prefix", LONG, 6)


@pytest.mark.parametrize("adapter_id", [None, *VARIANTS])
def test_chunked_rows_match_peft_for_every_kind(llama_world, adapter_id):
    result = run_engine(llama_world, lambda e: _one(e, greedy(LONG, adapter_id)), max_step_tokens=BUDGET,
                        prefix_cache_bytes=0)
    assert [t.id for t in result.tokens] == llama_world.oracle(adapter_id, LONG, 6)


async def _one(engine, req):
    return await engine.submit(req).result()


def test_rows_keep_decoding_while_a_long_prompt_is_prefilled(llama_world, widths):
    world = llama_world
    n = len(world.loaded.tokenizer(LONG).input_ids)

    async def go(engine):
        running = engine.submit(greedy(SHORT, "p_tuning_lstm", n=40))
        got: list[int] = []
        at_first_long_token = {}

        async def follow():
            async for event in running:
                if hasattr(event, "token"):
                    got.append(event.token.id)

        follower = asyncio.create_task(follow())
        while len(got) < 2:
            await asyncio.sleep(0.005)
        widths.clear()
        before = len(got)
        long = engine.submit(greedy(LONG, "prompt_tuning"))
        async for event in long:
            if hasattr(event, "token") and not at_first_long_token:
                at_first_long_token["running"] = len(got) - before
        await follower
        return await running.result(), await long.result(), at_first_long_token["running"]

    running, long, decoded_meanwhile = run_engine(world, go, max_step_tokens=BUDGET, prefix_cache_bytes=0)
    chunks = [w for w in widths if w > 1]
    assert len(chunks) >= n // BUDGET and max(chunks) <= BUDGET
    # every step that prefilled a chunk also gave the running row its next token
    assert decoded_meanwhile >= len(chunks) - 1
    assert [t.id for t in running.tokens] == world.oracle("p_tuning_lstm", SHORT, 40)
    assert [t.id for t in long.tokens] == world.oracle("prompt_tuning", LONG, 6)


def test_a_chunked_prompt_leaves_its_head_for_the_next_one(llama_world):
    world = llama_world
    n = len(world.loaded.tokenizer(LONG).input_ids)

    async def go(engine):
        first = await engine.submit(greedy(LONG, "p_tuning_mlp")).result()
        before = engine.stats()["prefix_cache_reused_tokens"]
        second = await engine.submit(greedy(LONG, "p_tuning_mlp")).result()
        return first, second, engine.stats()["prefix_cache_reused_tokens"] - before

    first, second, reused = run_engine(world, go, max_step_tokens=BUDGET)
    assert reused == n - 1  # the whole head came from the first request's chunks
    expected = world.oracle("p_tuning_mlp", LONG, 6)
    assert [t.id for t in first.tokens] == expected and [t.id for t in second.tokens] == expected


def test_prompt_logprobs_requests_are_prefilled_whole(llama_world, widths):
    world = llama_world
    n = len(world.loaded.tokenizer(LONG).input_ids)

    async def go(engine):
        widths.clear()
        req = GenerateRequest(prompt=LONG, max_new_tokens=2, prefill_logprobs=True)
        return await engine.submit(req).result()

    result = run_engine(world, go, max_step_tokens=BUDGET)
    assert widths == [n] and len(result.prefill) == n
