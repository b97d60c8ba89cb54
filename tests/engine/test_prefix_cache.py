"""Prefix caching keyed by adapter: reused heads give PEFT's tokens, and equal token ids under another adapter,
another version of one, or none never share keys/values. Plus the cache's exact state under its rules."""

from __future__ import annotations

import os

import torch

from prompt_server.engine.admission import _skip, adapter_key, columns
from prompt_server.engine.prefix_cache import MIN_REUSE_TOKENS, NO_ADAPTER, PrefixCache
from prompt_server.engine.types import GenerateRequest
from prompt_server.model.batch import KV
from tests.cycles import collector_off
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


def test_heads_sharing_a_system_prompt_hold_it_once_and_a_head_through_two_spans_matches_peft(llama_world):
    world = llama_world
    tok = world.loaded.tokenizer
    prompts = [SYSTEM + TAILS[0], SYSTEM + TAILS[1], SYSTEM + TAILS[0][:20] + " and then something else"]
    p0, p1, p2 = (tok(p).input_ids for p in prompts)
    shared = len(os.path.commonprefix([p0, p1]))
    through = len(os.path.commonprefix([p0, p2]))
    assert MIN_REUSE_TOKENS <= shared < through < len(p2) - 1  # the third's head runs into the first's own span

    async def go(engine):
        out = {}
        for adapter_id in (None, "prefix", "prompt_tuning"):
            key = adapter_key(world.registry.get(adapter_id) if adapter_id else None)
            results, reused = [], []
            for prompt in prompts:
                before = engine.stats()["prefix_cache_reused_tokens"]
                results.append(await engine.submit(greedy(prompt, adapter_id)).result())
                reused.append(engine.stats()["prefix_cache_reused_tokens"] - before)
                if len(results) == 2:  # the system prompt's span, then each prompt's own, every token once
                    held = sorted((e.start, e.tokens) for e in engine.prefix_cache.entries() if e.adapter == key)
            out[adapter_id] = results, reused, held
        return out

    for adapter_id, (results, reused, held) in run_engine(world, go).items():
        assert held == sorted([(0, p0[:shared]), (shared, p0[shared:-1]), (shared, p1[shared:-1])]), adapter_id
        assert reused == [0, shared, through], adapter_id
        for prompt, result in zip(prompts, results):
            world.check_logprobs(adapter_id, prompt, result)


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


def spans(cache: PrefixCache) -> list[tuple]:
    """(adapter, tokens before, tokens) of every cached span in eviction order (on probation, then protected, least
    recently used first); each span's keys/values checked to be its own positions' (kv(n) holds j at column j)."""
    for e in cache.entries():
        assert e.kv[0, 0, 0, :, 0].tolist() == list(range(e.start, e.start + len(e.tokens))), e.tokens
    return [(e.adapter, e.start, e.tokens) for e in cache.entries()]


def test_heads_that_start_alike_hold_what_they_share_once():
    unit = kv(1).numel() * 4  # bytes per token
    cache = PrefixCache(1 << 20)
    cache.store(A, [1, 2, 3, 4, 5], kv(5))
    cache.store(A, [1, 2, 3, 4, 5, 6, 7], kv(7))  # extends the first: only its last two tokens are added
    assert spans(cache) == [(A, 5, [6, 7]), (A, 0, [1, 2, 3, 4, 5])] and cache.bytes == 7 * unit
    # leaves the first span after 3 tokens: it is split there, so 9 tokens are held where three whole heads take 17
    cache.store(A, [1, 2, 3, 9, 9], kv(5))
    assert spans(cache) == [(A, 5, [6, 7]), (A, 3, [4, 5]), (A, 3, [9, 9]), (A, 0, [1, 2, 3])]
    assert cache.bytes == 9 * unit and cache.stats.stored == 3
    # a head through three spans, the last one partway; the same keys/values as one stored head would give. The
    # spans it reused are protected now, deepest first
    n, head = cache.lookup(A, [1, 2, 3, 4, 5, 6, 0])
    assert n == 6 and head[0, 0, 0, :, 0].tolist() == list(range(6))
    assert spans(cache) == [(A, 3, [9, 9]), (A, 5, [6, 7]), (A, 3, [4, 5]), (A, 0, [1, 2, 3])]
    n, pieces = cache.lookup_pieces(A, [1, 2, 3, 9, 9, 0])
    assert n == 5 and [(t.shape[3], used) for t, used in pieces] == [(3, 3), (2, 2)]
    # what is cached already need not be given again
    assert cache.cached_length(A, [1, 2, 3, 9, 9, 8]) == 5
    cache.store(A, [1, 2, 3, 9, 9, 8], kv(6)[:, :, :, 5:], start=5)
    assert spans(cache) == [(A, 5, [8]), (A, 5, [6, 7]), (A, 3, [4, 5]), (A, 3, [9, 9]), (A, 0, [1, 2, 3])]
    assert cache.bytes == 10 * unit
    cache.store(A, [7, 7, 7, 7, 7], kv(5)[:, :, :, 2:], start=2)  # its first two are not cached: not stored
    assert cache.bytes == 10 * unit and cache.lookup(A, [7, 7, 7, 7, 7, 7]) == (0, None)


def test_spans_never_reused_go_first_and_a_span_others_hang_from_never_goes():
    unit = kv(1).numel() * 4
    cache = PrefixCache(10 * unit)
    cache.store(A, [1, 2, 3, 4, 5, 6], kv(6))
    assert cache.lookup(A, [1, 2, 3, 4, 5, 6, 0])[0] == 6  # reused: protected
    cache.store(NO_ADAPTER, [8, 2, 3, 4], kv(4))  # 10, on probation
    # 4 more tokens: the span on probation goes, though the protected one is older
    cache.store(NO_ADAPTER, [9, 9, 9, 9], kv(4))
    assert spans(cache) == [(NO_ADAPTER, 0, [9, 9, 9, 9]), (A, 0, [1, 2, 3, 4, 5, 6])]
    assert cache.bytes == 10 * unit and cache.stats.evictions == 1
    # reused, it is protected too; protected spans past 80% of the budget go back on probation, oldest first
    assert cache.lookup(NO_ADAPTER, [9, 9, 9, 9, 0])[0] == 4  # its tree was emptied, then held the new head
    assert spans(cache) == [(A, 0, [1, 2, 3, 4, 5, 6]), (NO_ADAPTER, 0, [9, 9, 9, 9])]
    # leaves A's span after 4 tokens: room for [7, 8] only by evicting the other tree (A's span is needed); the
    # split copies both parts, holding the same bytes
    cache.store(A, [1, 2, 3, 4, 7, 8], kv(6))
    assert spans(cache) == [(A, 4, [5, 6]), (A, 4, [7, 8]), (A, 0, [1, 2, 3, 4])]
    assert cache.bytes == 8 * unit and cache.stats.evictions == 2
    assert cache.lookup(NO_ADAPTER, [9, 9, 9, 9, 0]) == (0, None)
    # the least recent leaf that the new span does not hang from goes ([5, 6] is older, but needed)
    cache.store(A, [1, 2, 3, 4, 5, 6, 1, 1, 1], kv(9))
    assert spans(cache) == [(A, 6, [1, 1, 1]), (A, 4, [5, 6]), (A, 0, [1, 2, 3, 4])]
    assert cache.bytes == 9 * unit and cache.stats.evictions == 3
    # a new version of "a": every span of the old one goes; a head larger than the whole budget is never stored
    cache.store(("a", 2, "sha-a2"), [5, 5, 5, 5], kv(4))
    assert spans(cache) == [(("a", 2, "sha-a2"), 0, [5, 5, 5, 5])] and cache.bytes == 4 * unit
    assert cache.lookup(A, [1, 2, 3, 4, 5, 6, 0]) == (0, None)
    cache.store(NO_ADAPTER, list(range(100, 111)), kv(11))
    assert cache.bytes == 4 * unit and cache.lookup(NO_ADAPTER, list(range(100, 112))) == (0, None)


def test_a_span_is_not_stored_when_only_evicting_what_it_hangs_from_would_make_room():
    unit = kv(1).numel() * 4
    cache = PrefixCache(6 * unit)
    cache.store(A, [1, 2, 3, 4], kv(4))
    cache.store(A, [1, 2, 3, 4, 5, 6, 7], kv(7))  # 3 more than the 2 left: only [1, 2, 3, 4] could go
    assert spans(cache) == [(A, 0, [1, 2, 3, 4])] and cache.bytes == 4 * unit and cache.stats.evictions == 0
    cache.store(A, [1, 2, 9, 9, 9], kv(5))  # 3 more, no room either: and the span is not split for nothing
    assert spans(cache) == [(A, 0, [1, 2, 3, 4])] and cache.bytes == 4 * unit
    assert cache.lookup(A, [1, 2, 3, 4, 5, 6, 7, 8])[0] == 4


def test_bytes_never_pass_the_budget_while_an_entry_goes_in():
    """Other threads read `bytes` (the engine's stats): room is made before an entry is added, never after."""
    unit = kv(1).numel() * 4
    cache = PrefixCache(10 * unit)
    seen = []
    remove = cache._remove

    def watched(node):
        seen.append(cache.bytes)  # what a reader could see at that moment
        remove(node)

    cache._remove = watched
    for first in range(6):
        cache.store(A, [first] + [1] * 4, kv(5))
        seen.append(cache.bytes)
    assert cache.stats.evictions == 4 and seen and max(seen) <= 10 * unit


def test_one_version_per_adapter_id_whatever_emptied_its_tree():
    """A store under another version of an adapter id drops the tree it had, also after eviction or a newer
    version's store emptied and forgot trees in between."""
    unit = kv(1).numel() * 4
    a2 = ("a", 2, "sha-a2")
    cache = PrefixCache(5 * unit)
    cache.store(A, [1, 2, 3, 4], kv(4))
    cache.store(NO_ADAPTER, [5, 6, 7, 8, 9], kv(5))  # evicts A's only span: its tree is forgotten
    assert spans(cache) == [(NO_ADAPTER, 0, [5, 6, 7, 8, 9])]
    cache.store(a2, [1, 2, 3, 4], kv(4))  # evicts the other tree's span; no tree of "a" left to drop
    assert spans(cache) == [(a2, 0, [1, 2, 3, 4])]
    cache.store(A, [1, 2, 3, 4], kv(4))  # a request admitted under version 1 finishing late: the last store wins
    assert spans(cache) == [(A, 0, [1, 2, 3, 4])] and cache.bytes == 4 * unit
    assert cache.lookup(a2, [1, 2, 3, 4, 0]) == (0, None) and cache.lookup(A, [1, 2, 3, 4, 0])[0] == 4
    cache.store(NO_ADAPTER, [1], kv(1))  # no adapter is an id of its own, never dropping another's tree
    assert spans(cache) == [(NO_ADAPTER, 0, [1]), (A, 0, [1, 2, 3, 4])] and cache.bytes == 5 * unit


def test_a_head_that_another_adapters_tree_holds_starts_protected_and_outlives_the_tails():
    """A chat template's system prompt under adapter after adapter: each new tree's copy of it starts protected
    (cut where the prompts part), so the unique tails stored after it go first, and its next prompt finds it."""
    unit = kv(1).numel() * 4
    b, c, d = ("b", 1, "sha-b"), ("c", 1, "sha-c"), ("d", 1, "sha-d")
    system = [7, 7, 7, 7, 7]
    cache = PrefixCache(15 * unit)
    cache.store(A, system + [1, 1], kv(7))  # the first tree: nothing to compare with, all on probation
    cache.store(b, system + [2, 2], kv(7))  # b's prompt begins as A's: the head protected, the tail on probation
    assert spans(cache) == [(A, 0, system + [1, 1]), (b, 5, [2, 2]), (b, 0, system)]
    assert cache.bytes == 14 * unit and cache.stats.stored == 3
    # 10 tokens of a prompt seen once: A's whole prompt and b's tail go, b's system prompt stays
    cache.store(NO_ADAPTER, [9] * 10, kv(10))
    assert spans(cache) == [(NO_ADAPTER, 0, [9] * 10), (b, 0, system)] and cache.stats.evictions == 2
    assert cache.lookup(b, system + [3, 3])[0] == 5
    # as far as the two prompts agree: c's first 7 tokens are in b's tree, its 8th is not
    cache = PrefixCache(100 * unit)
    cache.store(b, system + [2, 2], kv(7))
    cache.store(c, system + [2, 2, 3], kv(8))
    assert spans(cache) == [(b, 0, system + [2, 2]), (c, 7, [3]), (c, 0, system + [2, 2])]
    # 3 tokens in common are too few to count; a whole prompt that another tree holds starts protected, as one span
    cache.store(d, [7, 7, 7, 1], kv(4))
    cache.store(A, system, kv(5))
    assert spans(cache) == [(b, 0, system + [2, 2]), (c, 7, [3]), (d, 0, [7, 7, 7, 1]), (c, 0, system + [2, 2]),
                            (A, 0, system)]
    assert cache.stats.stored == 5


def test_a_dropped_versions_tree_frees_its_keys_and_values_at_once_not_at_the_next_garbage_collection():
    """A tree's nodes point at each other (parent <-> children), so a dropped tree left as it was is freed only by
    the cycle collector's next full pass, and under steady adapter replacement memory held that way ran past the
    budget. With the collector off, dropping a version's tree and evicting spans free their tensors right away."""
    import weakref

    a2 = ("a", 2, "sha-a2")
    cache = PrefixCache(10 * kv(1).numel() * 4)  # room for 10 tokens
    with collector_off() as left:
        cache.store(A, [1, 2, 3, 4, 5, 6], kv(6))
        cache.store(A, [1, 2, 3, 4, 7, 8], kv(6))  # splits the first span: a tree of three nodes
        assert [(start, tokens) for _, start, tokens in spans(cache)] == [(4, [5, 6]), (4, [7, 8]), (0, [1, 2, 3, 4])]
        held = [weakref.ref(e.kv) for e in cache.entries()]
        cache.store(a2, [1, 2, 3, 4, 5, 6], kv(6))  # another version of "a": version 1's tree goes
        assert spans(cache) == [(a2, 0, [1, 2, 3, 4, 5, 6])]
        assert [ref() is None for ref in held] == [True, True, True]
        evicted = weakref.ref(cache.entries()[0].kv)
        cache.store(NO_ADAPTER, [9] * 8, kv(8))  # room for it only by evicting a2's span
        assert [adapter for adapter, _, _ in spans(cache)] == [NO_ADAPTER] and evicted() is None
    assert left == []


def test_columns_reads_a_rows_spans_alike_from_per_layer_and_whole_caches():
    """What a prompt head or a chunk keeps of a row (admission.columns): its columns of every layer, keys and values,
    span after span, the same from a cache allocated layer by layer and one allocated for all layers at once (a
    slice per span); `_skip` drops a head's first columns that are cached already, across spans."""
    layers, slots, heads, width, d = 3, 2, 2, 9, 4
    whole = torch.arange(layers * 2 * slots * heads * width * d, dtype=torch.float32).view(
        layers, 2, slots, heads, width, d)
    per_layer = KV([whole[i, 0].clone() for i in range(layers)], [whole[i, 1].clone() for i in range(layers)], width)
    at_once = KV([whole[i, 0] for i in range(layers)], [whole[i, 1] for i in range(layers)], width, whole=whole)
    spans = [(1, 3), (5, 5), (6, 9)]  # an empty span in between
    expected = torch.cat([whole[:, :, 1, :, 1:3], whole[:, :, 1, :, 6:9]], dim=3)  # [L, 2, heads, 5, d]
    for kv in (per_layer, at_once):
        got = columns(kv, 1, spans)
        assert torch.equal(got, expected) and got.is_contiguous()
        one = columns(kv, 0, [(2, 4)])
        assert torch.equal(one, whole[:, :, 0, :, 2:4]) and one.is_contiguous()
        assert one.untyped_storage().data_ptr() != whole.untyped_storage().data_ptr()  # a copy, not a view
    assert _skip([(1, 3), (6, 9)], 0) == [(1, 3), (6, 9)]
    assert _skip([(1, 3), (6, 9)], 1) == [(2, 3), (6, 9)]
    assert _skip([(1, 3), (6, 9)], 3) == [(7, 9)]
    assert _skip([(1, 3), (6, 9)], 5) == []
