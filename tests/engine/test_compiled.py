"""The lean forward's layers compiled (settings.compile): the same tokens and log-probabilities as PEFT for every
adapter kind, mixed, joining mid-flight and beside a chunked prefill, with one compilation for every step; and the
cases that serve uncompiled instead, saying why."""

from __future__ import annotations

import asyncio
import logging

import pytest
import torch

from prompt_server.config import Settings
from prompt_server.engine.engine import Engine
from prompt_server.engine.types import GenerateRequest
from prompt_server.model import compiled
from tests.engine.conftest import run_engine
from tests.tiny import VARIANTS

PROMPTS = ["the cat sat on the mat", "hello world", "once upon a time there was", "a b c"]
LONG = ("Once upon a time there was a little cat who lived in a small house by the river. The weather is good and "
        "the sun is shining. It was a great day, and the movie was wonderful.")

pytestmark = pytest.mark.slow  # the first engine compiles the tiny model's layers (about half a minute here)


def greedy(prompt: str, adapter_id: str | None = None, n: int = 8) -> GenerateRequest:
    return GenerateRequest(prompt=prompt, adapter_id=adapter_id, max_new_tokens=n, ignore_eos=True)


def test_compiled_rows_match_peft_mixed_joining_and_beside_a_chunked_prefill(llama_world):
    world = llama_world
    cases = [(a, p) for a in (None, *VARIANTS) for p in PROMPTS[:2]]
    # the start-up self-check compiles the layers, before the fixture forbids recompiling
    engine = Engine(world.loaded, world.registry, Settings(compile=True, max_step_tokens=16))
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


def test_compiled_rows_match_peft_log_probabilities(llama_world):
    """Token log-probabilities within 1e-4 of PEFT's, teacher-forced on the served tokens."""
    world = llama_world
    adapters = ("prompt_tuning", "p_tuning_mlp", "prefix", None)

    async def go(engine):
        assert engine.runner.compiled is not None
        handles = [engine.submit(greedy(PROMPTS[0], a)) for a in adapters]
        return [await h.result() for h in handles]

    for adapter_id, result in zip(adapters, run_engine(world, go, compile=True)):
        assert len(result.tokens) == 8
        world.check_logprobs(adapter_id, PROMPTS[0], result)


def test_a_forward_path_that_is_not_compiled_is_served_uncompiled_and_says_why(gpt2_world, caplog):
    async def go(engine):
        assert getattr(engine.runner, "compiled", None) is None
        return await engine.submit(greedy(PROMPTS[0], "prompt_tuning")).result()

    with caplog.at_level(logging.WARNING, logger="prompt_server.engine"):
        result = run_engine(gpt2_world, go, compile=True)
    assert [t.id for t in result.tokens] == gpt2_world.oracle("prompt_tuning", PROMPTS[0], 8)
    assert "serving the generic forward uncompiled: only the lean forward path is compiled" in caplog.text


def test_a_compiler_failure_leaves_the_model_served_uncompiled(llama_world, monkeypatch, caplog):
    def fail(model):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(compiled, "compiled_layers", fail)

    async def go(engine):
        assert engine.runner.compiled is None
        return await engine.submit(greedy(PROMPTS[1], "p_tuning_mlp")).result()

    with caplog.at_level(logging.WARNING, logger="prompt_server.engine"):
        result = run_engine(llama_world, go, compile=True)
    assert [t.id for t in result.tokens] == llama_world.oracle("p_tuning_mlp", PROMPTS[1], 8)
    assert "serving the lean forward uncompiled: RuntimeError: no C++ compiler" in caplog.text


def test_only_float32_on_the_cpu_is_compiled(llama_world):
    half = torch.nn.Linear(2, 2).to(torch.bfloat16)
    assert "float32 on the CPU" in compiled.supported(half)
    assert compiled.supported(llama_world.loaded.model) is None
