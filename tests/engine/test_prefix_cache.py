"""Prefix caching keyed by adapter: reused heads give PEFT's tokens, and equal token ids under another adapter,
another version of one, or none never share keys/values. Plus the cache's exact state under its rules."""

from __future__ import annotations

import torch

from prompt_server.engine.prefix_cache import MIN_REUSE_TOKENS, NO_ADAPTER, PrefixCache
from prompt_server.engine.types import GenerateRequest
from tests.engine.conftest import put_dir, run_engine
from tests.tiny import make_peft, save_peft

SYSTEM = "You are a helpful assistant. Please answer the question in one short sentence."
TAILS = [" Hello world! How are you today?", " Question: what is the capital of France? Answer:"]


def greedy(prompt: str, adapter_id: str | None = None, n: int = 8, **kw) -> GenerateRequest:
    return GenerateRequest(prompt=prompt, adapter_id=adapter_id, max_new_tokens=n, ignore_eos=True, **kw)


def test_a_shared_head_is_reused_and_rows_still_match_peft(llama_world):
    world = llama_world
    head_len = len(world.loaded.tokenizer(SYSTEM).input_ids)

    async def go(engine):
        out = {}
        for adapter_id in (None, "prefix", "prompt_tuning", "p_tuning_lstm"):
            before = engine.stats()["prefix_cache_reused_tokens"]
            first = await engine.submit(greedy(SYSTEM + TAILS[0], adapter_id)).result()
            second = await engine.submit(greedy(SYSTEM + TAILS[1], adapter_id)).result()
            out[adapter_id] = first, second, engine.stats()["prefix_cache_reused_tokens"] - before
        return out

    for adapter_id, (first, second, reused) in run_engine(world, go).items():
        assert reused >= head_len - 1, (adapter_id, reused)  # the second prompt prefilled only past the head
        assert [t.id for t in first.tokens] == world.oracle(adapter_id, SYSTEM + TAILS[0], 8), adapter_id
        assert [t.id for t in second.tokens] == world.oracle(adapter_id, SYSTEM + TAILS[1], 8), adapter_id


def test_equal_tokens_under_other_adapters_or_none_never_share(llama_world, tmp_path):
    """Two prompt-tuning adapters of the same length put the prompt at the same positions: only the key tells them
    apart (the bug TensorRT-LLM and lmdeploy shipped)."""
    world = llama_world
    model_dir = world.loaded.path
    twins = {name: make_peft(model_dir, "prompt_tuning", seed=seed, num_virtual_tokens=5)
             for name, seed in (("iso-a", 31), ("iso-b", 32))}
    for name, pm in twins.items():
        put_dir(world.registry, name, save_peft(pm, tmp_path / name))
        world.peft[name] = pm
    prompt = SYSTEM + TAILS[0]
    try:
        async def go(engine):
            results, reused = {}, []
            for adapter_id in ("iso-a", "iso-b", None, "iso-a"):
                before = engine.stats()["prefix_cache_reused_tokens"]
                results.setdefault(adapter_id, []).append(await engine.submit(greedy(prompt, adapter_id)).result())
                reused.append(engine.stats()["prefix_cache_reused_tokens"] - before)
            return results, reused

        results, reused = run_engine(world, go)
        head = len(world.loaded.tokenizer(prompt).input_ids) - 1
        assert reused == [0, 0, 0, head]  # only iso-a's own head comes back, for iso-a
        for adapter_id, runs in results.items():
            for r in runs:
                assert [t.id for t in r.tokens] == world.oracle(adapter_id, prompt, 8), adapter_id
        assert [t.id for t in results["iso-a"][0].tokens] != [t.id for t in results["iso-b"][0].tokens]
    finally:
        for name in twins:
            world.registry.delete(name)
            world.peft.pop(name)


def test_a_new_version_of_an_adapter_never_reuses_the_old_versions_heads(llama_world, tmp_path):
    world = llama_world
    model_dir = world.loaded.path
    v1, v2 = (make_peft(model_dir, "prefix", seed=seed, num_virtual_tokens=4) for seed in (41, 42))
    put_dir(world.registry, "ver", save_peft(v1, tmp_path / "v1"))
    prompt = SYSTEM + TAILS[1]
    try:
        async def go(engine):
            old = await engine.submit(greedy(prompt, "ver")).result()
            put_dir(world.registry, "ver", save_peft(v2, tmp_path / "v2"))
            before = engine.stats()["prefix_cache_reused_tokens"]
            new = await engine.submit(greedy(prompt, "ver")).result()
            versions = {e.adapter[1] for e in engine.prefix_cache.entries() if e.adapter[0] == "ver"}
            return old, new, engine.stats()["prefix_cache_reused_tokens"] - before, versions

        old, new, reused, versions = run_engine(world, go)
        assert reused == 0 and versions == {new.adapter_version} and new.adapter_version == old.adapter_version + 1
        world.peft["ver"] = v2
        assert [t.id for t in new.tokens] == world.oracle("ver", prompt, 8)
        world.peft["ver"] = v1
        assert [t.id for t in old.tokens] == world.oracle("ver", prompt, 8)
    finally:
        world.registry.delete("ver")
        world.peft.pop("ver", None)


def test_prompt_logprobs_requests_prefill_every_token(llama_world):
    world = llama_world
    prompt = SYSTEM + TAILS[0]

    async def go(engine):
        await engine.submit(greedy(prompt)).result()  # caches the head
        before = engine.stats()["prefix_cache_reused_tokens"]
        detailed = await engine.submit(greedy(prompt, prefill_logprobs=True)).result()
        return detailed, engine.stats()["prefix_cache_reused_tokens"] - before

    detailed, reused = run_engine(world, go)
    assert reused == 0
    assert len(detailed.prefill) == len(world.loaded.tokenizer(prompt).input_ids)
    assert all(t.logprob <= 0 for t in detailed.prefill[1:])


def test_off_when_the_budget_is_zero(llama_world):
    async def go(engine):
        await engine.submit(greedy(SYSTEM + TAILS[0])).result()
        return engine.prefix_cache, engine.stats()

    cache, stats = run_engine(llama_world, go, prefix_cache_bytes=0)
    assert cache is None and "prefix_cache_hits" not in stats


# ---- the cache alone --------------------------------------------------------------------------------------------

A = ("a", 1, "sha-a")


def kv(n: int) -> torch.Tensor:
    return torch.arange(n, dtype=torch.float32).view(1, 1, 1, n, 1).expand(2, 2, 1, n, 1).contiguous()


def test_lookup_takes_the_longest_head_and_always_leaves_the_last_token():
    cache = PrefixCache(1 << 20)
    cache.store(A, list(range(10)), kv(10))
    n, head = cache.lookup(A, list(range(6)) + [99, 98])
    assert n == 6 and head.shape == (2, 2, 1, 6, 1) and head[0, 0, 0, :, 0].tolist() == list(range(6))
    n, head = cache.lookup(A, list(range(10)))  # the whole entry matches: its last token must still run
    assert n == 9 and head.shape[3] == 9
    assert cache.lookup(A, list(range(MIN_REUSE_TOKENS - 1)) + [99]) == (0, None)  # too short to be worth a copy
    assert cache.lookup(NO_ADAPTER, list(range(10))) == (0, None)
    assert cache.lookup(("a", 2, "sha-a2"), list(range(10))) == (0, None)
    assert (cache.stats.hits, cache.stats.reused_tokens) == (2, 15)


def test_store_replaces_what_it_extends_and_other_versions_and_evicts_least_recent():
    unit = kv(1).numel() * 4  # bytes per token
    cache = PrefixCache(20 * unit)
    cache.store(A, [1, 2, 3, 4, 5], kv(5))
    cache.store(A, [1, 2, 3, 4, 5, 6, 7], kv(7))  # extends the first: the first goes
    assert [e.tokens for e in cache.entries()] == [[1, 2, 3, 4, 5, 6, 7]] and cache.bytes == 7 * unit
    cache.store(NO_ADAPTER, [1, 2, 3, 4, 5], kv(5))
    cache.store(A, [9, 9, 9, 9, 9, 9], kv(6))
    assert cache.lookup(A, [1, 2, 3, 4, 5, 6, 0])[0] == 6  # touches the first entry: now most recent
    cache.store(NO_ADAPTER, [7, 7, 7, 7, 7], kv(5))  # 23 tokens > 20: the least recently used goes
    assert [(e.adapter, e.tokens[0]) for e in cache.entries()] == [(A, 9), (A, 1), (NO_ADAPTER, 7)]
    assert cache.bytes == 18 * unit and cache.stats.evictions == 1
    cache.store(("a", 2, "sha-a2"), [5, 5, 5, 5, 5], kv(5))  # a new version of "a": the old version's entries go
    assert [(e.adapter[1], e.tokens[0]) for e in cache.entries()] == [(0, 7), (2, 5)]
    assert cache.lookup(A, [9, 9, 9, 9, 9, 9, 9]) == (0, None)
    assert cache.bytes == 10 * unit


def test_bytes_never_pass_the_budget_while_an_entry_goes_in():
    """Other threads read `bytes` (the engine's stats): room is made before an entry is added, never after."""
    unit = kv(1).numel() * 4
    cache = PrefixCache(10 * unit)
    seen = []
    remove = cache._remove

    def watched(entry_id):
        seen.append(cache.bytes)  # what a reader could see at that moment
        remove(entry_id)

    cache._remove = watched
    for first in range(6):
        cache.store(A, [first] + [1] * 4, kv(5))
        seen.append(cache.bytes)
    assert cache.stats.evictions == 4 and seen and max(seen) <= 10 * unit
