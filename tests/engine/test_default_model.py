"""The real default model: a mixed batch of every adapter kind gives PeftModel's greedy tokens for each row."""

from __future__ import annotations

import pytest

from tests.engine.conftest import build_world, run_engine
from tests.engine.test_engine import greedy
from tests.tiny import VARIANTS

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "Write a haiku about the sea:"]


def test_mixed_batch_on_the_default_model_matches_peft(default_model_dir, tmp_path):
    world = build_world(default_model_dir, tmp_path)
    cases = [(a, p) for a in (None, *VARIANTS) for p in PROMPTS]

    async def go(engine):
        handles = [engine.submit(greedy(p, a, n=6)) for a, p in cases]
        return [await h.result() for h in handles]

    results = run_engine(world, go)
    for (adapter_id, prompt), result in zip(cases, results):
        assert [t.id for t in result.tokens] == world.oracle(adapter_id, prompt, 6), (adapter_id, prompt)
