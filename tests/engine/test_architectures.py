"""Every decoder-only family the server is tested on: one mixed batch of every soft-prompt kind and no-adapter rows,
each row equal to PeftModel's batch-of-one greedy tokens, on the forward path the family is expected to take."""

from __future__ import annotations

import pytest

from prompt_server.engine.types import GenerateRequest, InvalidRequest
from tests.engine.conftest import build_world, run_engine
from tests.tiny import ARCHITECTURES, VARIANTS, save_tiny_arch

PROMPTS = ["the cat sat on the mat", "hello world how are you"]
NEW_TOKENS = 8


@pytest.mark.parametrize("model_type", list(ARCHITECTURES))
def test_mixed_batch_matches_peft_on_every_architecture(model_type, tmp_path):
    world = build_world(save_tiny_arch(model_type, tmp_path / "model"), tmp_path / "adapters")
    expected_path = ARCHITECTURES[model_type][0]
    assert world.loaded.plan.forward_path == expected_path, world.loaded.plan
    # no-adapter rows first and last, so adapter rows sit between plain ones in the batch
    cases = [(None, PROMPTS[0]), *((v, PROMPTS[i % 2]) for i, v in enumerate(VARIANTS)), (None, PROMPTS[1])]

    async def go(engine):
        handles = [engine.submit(GenerateRequest(prompt=p, adapter_id=a, max_new_tokens=NEW_TOKENS, ignore_eos=True))
                   for a, p in cases]
        return [await h.result() for h in handles]

    results = run_engine(world, go)
    for (adapter_id, prompt), result in zip(cases, results):
        assert [t.id for t in result.tokens] == world.oracle(adapter_id, prompt, NEW_TOKENS), (adapter_id, prompt)


def test_a_sliding_window_caps_the_context_where_windowed_equals_full_attention(tmp_path):
    world = build_world(save_tiny_arch("mistral", tmp_path / "model", sliding_window=24), tmp_path / "adapters")
    plan = world.loaded.plan
    assert plan.max_position == 24 and "sliding_window 24" in plan.notes[0]

    prompt_len = len(world.loaded.tokenizer(PROMPTS[0]).input_ids)
    fits = 24 - prompt_len

    async def go(engine):
        with pytest.raises(InvalidRequest, match="exceed the model's context of 24"):
            engine.submit(GenerateRequest(prompt=PROMPTS[0], max_new_tokens=fits + 1))
        return await engine.submit(GenerateRequest(prompt=PROMPTS[0], max_new_tokens=fits, ignore_eos=True)).result()

    result = run_engine(world, go)
    assert result.finish_reason == "length" and len(result.tokens) == fits
    assert [t.id for t in result.tokens] == world.oracle(None, PROMPTS[0], fits)
