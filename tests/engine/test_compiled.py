"""The lean forward's layers compiled (settings.compile): the same tokens and log-probabilities as PEFT for every
adapter kind, mixed, joining mid-flight and beside a chunked prefill, with one compilation for every step; and the
cases that serve uncompiled instead, saying why."""

from __future__ import annotations

import asyncio
import dataclasses
import logging

import pytest
import torch

from prompt_server.config import Settings
from prompt_server.engine.engine import Engine
from prompt_server.engine.types import GenerateRequest
from prompt_server.model import compiled
from prompt_server.model.loader import load_model
from tests.engine.conftest import World, run_engine
from tests.tiny import VARIANTS

PROMPTS = ["the cat sat on the mat", "hello world", "once upon a time there was", "a b c"]
LONG = ("Once upon a time there was a little cat who lived in a small house by the river. The weather is good and "
        "the sun is shining. It was a great day, and the movie was wonderful.")

pytestmark = pytest.mark.slow  # loading with compile=True compiles the tiny model's layers (about 15 s here)


@pytest.fixture(scope="module")
def compiled_world(llama_world, tiny_llama_dir) -> World:
    """The llama world's adapters and PEFT oracle over the same tiny model loaded with its layers compiled."""
    loaded = load_model(tiny_llama_dir, device="cpu", progress=False, compile=True)
    assert loaded.plan.compiled and loaded.plan.forward_path == "lean"
    return dataclasses.replace(llama_world, loaded=loaded)


def greedy(prompt: str, adapter_id: str | None = None, n: int = 8) -> GenerateRequest:
    return GenerateRequest(prompt=prompt, adapter_id=adapter_id, max_new_tokens=n, ignore_eos=True)


def test_compiled_rows_match_peft_mixed_joining_and_beside_a_chunked_prefill(compiled_world):
    world = compiled_world
    cases = [(a, p) for a in (None, *VARIANTS) for p in PROMPTS[:2]]
    # loading compiled the layers (the self-check ran them); from here on nothing may recompile
    engine = Engine(world.loaded, world.registry, Settings(max_step_tokens=16))
    assert engine.runner.compiled is not None
    engine.start()

    async def go():
        mixed = [engine.submit(greedy(p, a)) for a, p in cases]
        mixed = [await h.result() for h in mixed]
        first = engine.submit(greedy(PROMPTS[2], "prefix", n=24))
        late, seen = [], 0
        async for _ in first:
            seen += 1
            if seen == 4:  # the batch is running: newcomers of every kind join it, one of them chunked
                late = [engine.submit(greedy(PROMPTS[1], v, n=10)) for v in ("prompt_tuning", "p_tuning_lstm")]
                late.append(engine.submit(greedy(LONG, "prefix_projection", n=6)))
        return mixed, await first.result(), [await h.result() for h in late]

    torch.compiler.set_stance("fail_on_recompile")
    try:
        mixed, first, late = asyncio.run(go())
    finally:
        torch.compiler.set_stance("default")
        engine.stop()
    for (adapter_id, prompt), result in zip(cases, mixed):
        assert [t.id for t in result.tokens] == world.oracle(adapter_id, prompt, 8), (adapter_id, prompt)
    assert [t.id for t in first.tokens] == world.oracle("prefix", PROMPTS[2], 24)
    expected = [world.oracle("prompt_tuning", PROMPTS[1], 10), world.oracle("p_tuning_lstm", PROMPTS[1], 10),
                world.oracle("prefix_projection", LONG, 6)]
    assert [[t.id for t in r.tokens] for r in late] == expected
    assert len(world.loaded.tokenizer(LONG).input_ids) > 16  # the long prompt really was cut into chunks


def test_compiled_rows_match_peft_log_probabilities(compiled_world):
    """Token log-probabilities within 1e-4 of PEFT's, teacher-forced on the served tokens."""
    world = compiled_world
    adapters = ("prompt_tuning", "p_tuning_mlp", "prefix", None)

    async def go(engine):
        assert engine.runner.compiled is not None
        handles = [engine.submit(greedy(PROMPTS[0], a)) for a in adapters]
        return [await h.result() for h in handles]

    for adapter_id, result in zip(adapters, run_engine(world, go)):
        assert len(result.tokens) == 8
        world.check_logprobs(adapter_id, PROMPTS[0], result)


def test_a_forward_path_that_is_not_compiled_is_served_uncompiled_and_says_why(tiny_gpt2_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="prompt_server.model.loader"):
        loaded = load_model(tiny_gpt2_dir, device="cpu", progress=False, compile=True)
    assert loaded.plan.forward_path == "generic" and not loaded.plan.compiled
    assert "serving the generic forward uncompiled: only the lean forward path is compiled" in caplog.text


def test_a_compiler_failure_leaves_the_model_served_uncompiled(llama_world, tiny_llama_dir, monkeypatch, caplog):
    def fail(model):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(compiled, "compiled_layers", fail)
    with caplog.at_level(logging.WARNING, logger="prompt_server.model.loader"):
        loaded = load_model(tiny_llama_dir, device="cpu", progress=False, compile=True)
    assert loaded.plan.forward_path == "lean" and not loaded.plan.compiled
    assert "serving the lean forward uncompiled: RuntimeError: no C++ compiler" in caplog.text
    world = dataclasses.replace(llama_world, loaded=loaded)

    async def go(engine):
        assert engine.runner.compiled is None
        return await engine.submit(greedy(PROMPTS[1], "p_tuning_mlp")).result()

    result = run_engine(world, go)
    assert [t.id for t in result.tokens] == world.oracle("p_tuning_mlp", PROMPTS[1], 8)


def test_only_float32_on_the_cpu_is_compiled(llama_world):
    half = torch.nn.Linear(2, 2).to(torch.bfloat16)
    assert "float32 on the CPU" in compiled.supported(half)
    assert compiled.supported(llama_world.loaded.model) is None
