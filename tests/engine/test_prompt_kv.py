"""Soft prompts computed once: the cached keys/values equal the model's own, rows using them equal PEFT, and the
cache's state (entries, hits, misses, evictions, pins, versions) is exactly what its rules say."""

from __future__ import annotations

import pytest
import torch

from prompt_server.engine import prompt_kv
from prompt_server.engine.prompt_kv import key_of
from prompt_server.engine.types import GenerateRequest
from prompt_server.model import forward
from prompt_server.model.batch import build_prefill
from tests.engine.conftest import build_world, put_dir, run_engine
from tests.tiny import make_peft, save_peft, save_tiny_arch

PROMPT = "the cat sat on the mat"
VIRTUAL = ("prompt_tuning", "p_tuning_mlp", "p_tuning_lstm")


def greedy(adapter_id: str | None, n: int = 8, prompt: str = PROMPT) -> GenerateRequest:
    return GenerateRequest(prompt=prompt, adapter_id=adapter_id, max_new_tokens=n, ignore_eos=True)


def entry_bytes(world, adapter_id: str) -> int:
    spec, v = world.loaded.spec, world.registry.get(adapter_id).num_virtual_tokens
    return spec.num_layers * 2 * spec.num_kv_heads * v * spec.head_dim * 4  # float32


def test_cached_keys_and_values_are_the_models_own(llama_world):
    world = llama_world
    adapter = world.registry.get("p_tuning_lstm")
    peft = world.peft["p_tuning_lstm"]

    async def go(engine):
        return engine.prompt_kv.get_many([adapter])[key_of(adapter)]

    cached = run_engine(world, go)  # [L, 2, kv_heads, V, d]
    with torch.inference_mode():
        prompt = peft.get_prompt(batch_size=1)  # PEFT's virtual-token embeddings [1, V, hidden]
        out = world.loaded.model(inputs_embeds=prompt, use_cache=True)
    for i, layer in enumerate(out.past_key_values.layers):
        torch.testing.assert_close(cached[i, 0], layer.keys[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(cached[i, 1], layer.values[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("budget", [0, 1 << 28], ids=["inline", "cached"])
def test_rows_match_peft_logits_with_and_without_the_cache(llama_world, budget):
    """Token log-probabilities within 1e-4 of PEFT's, teacher-forced on the served tokens."""
    world = llama_world

    async def go(engine):
        assert (engine.prompt_kv is None) == (budget == 0)
        handles = [engine.submit(greedy(a)) for a in (*VIRTUAL, None)]
        return [await h.result() for h in handles]

    for adapter_id, result in zip((*VIRTUAL, None), run_engine(world, go, prompt_kv_cache_bytes=budget)):
        assert len(result.tokens) == 8
        world.check_logprobs(adapter_id, PROMPT, result)


def test_an_adapter_version_is_computed_once(llama_world):
    world = llama_world

    async def go(engine):
        for _ in range(3):
            await engine.submit(greedy("prompt_tuning")).result()
        await engine.submit(greedy("prefix")).result()  # prefixes are keys/values already: not cached
        both = [engine.submit(greedy("p_tuning_mlp")), engine.submit(greedy("p_tuning_mlp", prompt="hello world"))]
        for h in both:
            await h.result()
        return engine.stats(), engine.prompt_kv.entries()

    stats, keys = run_engine(world, go)
    assert (stats["prompt_kv_misses"], stats["prompt_kv_evictions"]) == (2, 0)
    # two hits for prompt_tuning; the p_tuning_mlp pair is one lookup when admitted together, two when a step apart
    assert stats["prompt_kv_hits"] in (2, 3)
    assert [k[0] for k in keys] == ["prompt_tuning", "p_tuning_mlp"]
    assert stats["prompt_kv_bytes"] == entry_bytes(world, "prompt_tuning") + entry_bytes(world, "p_tuning_mlp")


def test_the_least_recently_used_entry_is_evicted_and_recomputed_exactly(llama_world):
    world = llama_world
    budget = entry_bytes(world, "p_tuning_lstm")  # room for one entry
    order = ["prompt_tuning", "p_tuning_lstm", "prompt_tuning"]

    async def go(engine):
        results, states = [], []
        for adapter_id in order:
            results.append(await engine.submit(greedy(adapter_id)).result())
            states.append([k[0] for k in engine.prompt_kv.entries()])
        return results, states, engine.stats()

    results, states, stats = run_engine(world, go, prompt_kv_cache_bytes=budget)
    assert states == [["prompt_tuning"], ["p_tuning_lstm"], ["prompt_tuning"]]
    assert (stats["prompt_kv_misses"], stats["prompt_kv_hits"], stats["prompt_kv_evictions"]) == (3, 0, 2)
    for adapter_id, result in zip(order, results):
        assert [t.id for t in result.tokens] == world.oracle(adapter_id, PROMPT, 8), adapter_id


def test_a_pinned_adapter_stays_while_others_come_and_go(llama_world):
    world = llama_world
    budget = entry_bytes(world, "prompt_tuning") + entry_bytes(world, "p_tuning_lstm")

    async def go(engine):
        states = []
        for adapter_id in ["prompt_tuning", "p_tuning_mlp", "p_tuning_lstm", "prompt_tuning"]:
            await engine.submit(greedy(adapter_id)).result()
            states.append([k[0] for k in engine.prompt_kv.entries()])
        return states, engine.stats()

    states, stats = run_engine(world, go, prompt_kv_cache_bytes=budget, pinned_adapters="prompt_tuning, other")
    # p_tuning_lstm does not fit beside the other two: the unpinned, least recently used p_tuning_mlp goes
    assert states == [["prompt_tuning"], ["prompt_tuning", "p_tuning_mlp"], ["prompt_tuning", "p_tuning_lstm"],
                      ["p_tuning_lstm", "prompt_tuning"]]
    assert (stats["prompt_kv_misses"], stats["prompt_kv_hits"], stats["prompt_kv_evictions"]) == (3, 1, 1)


def test_a_pinned_entry_outlasts_pressure_that_evicts_every_newcomer(llama_world):
    world = llama_world
    budget = entry_bytes(world, "p_tuning_lstm")  # the pinned entry leaves no room for another beside it

    async def go(engine):
        states = []
        for adapter_id in ["prompt_tuning", "p_tuning_mlp", "p_tuning_lstm"]:
            result = await engine.submit(greedy(adapter_id)).result()
            assert [t.id for t in result.tokens] == world.oracle(adapter_id, PROMPT, 8)  # used, then dropped
            states.append([k[0] for k in engine.prompt_kv.entries()])
        return states

    assert run_engine(world, go, prompt_kv_cache_bytes=budget, pinned_adapters="prompt_tuning") == [
        ["prompt_tuning"]] * 3


def test_a_replaced_adapter_is_never_served_from_its_old_keys(llama_world, tmp_path):
    world = llama_world
    registry = world.registry
    model_dir = world.loaded.path
    first = make_peft(model_dir, "prompt_tuning", seed=21, num_virtual_tokens=6)
    second = make_peft(model_dir, "prompt_tuning", seed=22, num_virtual_tokens=6)  # same shape, other weights
    put_dir(registry, "kv-swap", save_peft(first, tmp_path / "v1"))
    try:
        async def go(engine):
            before = await engine.submit(greedy("kv-swap")).result()
            old_key = engine.prompt_kv.entries()[-1]
            put_dir(registry, "kv-swap", save_peft(second, tmp_path / "v2"))
            after = await engine.submit(greedy("kv-swap")).result()
            return before, after, old_key, engine.prompt_kv.entries()

        before, after, old_key, keys = run_engine(world, go)
        assert old_key == ("kv-swap", before.adapter_version, old_key[2])
        assert after.adapter_version == before.adapter_version + 1
        assert [k for k in keys if k[0] == "kv-swap"] == [key_of(registry.get("kv-swap"))]  # the old entry is gone
        world.peft["kv-swap"] = second
        assert [t.id for t in after.tokens] == world.oracle("kv-swap", PROMPT, 8)
        world.peft["kv-swap"] = first
        assert [t.id for t in before.tokens] == world.oracle("kv-swap", PROMPT, 8)
        assert [t.id for t in before.tokens] != [t.id for t in after.tokens]
    finally:
        registry.delete("kv-swap")
        world.peft.pop("kv-swap", None)


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_a_hundred_virtual_tokens_are_run_once_then_rows_prefill_only_their_prompts(model_type, tmp_path,
                                                                                     monkeypatch):
    """The prompt-tuning paper's 100 virtual tokens, on the lean (llama) and the generic (gpt2) path."""
    world = build_world(save_tiny_arch(model_type, tmp_path / "m"), tmp_path / "a")
    pm = make_peft(world.loaded.path, "prompt_tuning", seed=5, num_virtual_tokens=100)
    put_dir(world.registry, "long", save_peft(pm, tmp_path / "long"))
    world.peft["long"] = pm
    prompts = (PROMPT, "hello world")
    widths = []

    def spy(rows, pad_id, device):
        inputs = build_prefill(rows, pad_id, device)
        widths.append(inputs.ids.shape[1])  # embedding columns this prefill runs
        return inputs

    monkeypatch.setattr(prompt_kv, "build_prefill", spy)
    monkeypatch.setattr(forward, "build_prefill", spy)  # a runner's layout of newcomers

    async def go(engine):
        widths.clear()  # the engine's warm-up
        handles = [engine.submit(greedy("long", prompt=p)) for p in prompts]
        return [await h.result() for h in handles], engine.stats()

    results, stats = run_engine(world, go)
    assert stats["prompt_kv_misses"] == 1  # computed once, for both rows (admitted together or one step apart)
    longest = max(len(world.loaded.tokenizer(p).input_ids) for p in prompts)
    assert widths[0] == 100 and 2 <= len(widths) <= 3 and max(widths[1:]) <= longest, widths
    for prompt, result in zip(prompts, results):
        assert [t.id for t in result.tokens] == world.oracle("long", prompt, 8), prompt


def test_virtual_tokens_computed_for_newcomers_count_against_the_step_budget(llama_world):
    """Three newcomers on three adapters with nothing cached, 20 tokens a step: two rows' prompts would fit one
    step, but not with their virtual tokens, so each step computes one adapter's; the rows still match PEFT."""
    world = llama_world
    budget = 20
    prompt_len = len(world.loaded.tokenizer(PROMPT).input_ids)
    sizes = sorted(world.registry.get(a).num_virtual_tokens for a in VIRTUAL)
    assert sizes[-1] + prompt_len <= budget  # one row with its virtual tokens fits a step
    assert 2 * prompt_len <= budget < sizes[0] + sizes[1] + 2 * prompt_len  # two fit only without them
    computed: list[list[str]] = []

    async def go(engine):
        compute = engine.prompt_kv._compute

        def spy(adapters):
            computed.append([a.id for a in adapters])
            return compute(adapters)

        engine.prompt_kv._compute = spy
        with engine._cond:  # queued together: the engine plans no step until all three wait
            handles = [engine.submit(greedy(a)) for a in VIRTUAL]
        return [await h.result() for h in handles]

    results = run_engine(world, go, max_step_tokens=budget)
    assert computed == [[a] for a in VIRTUAL]
    for adapter_id, result in zip(VIRTUAL, results):
        world.check_logprobs(adapter_id, PROMPT, result)
