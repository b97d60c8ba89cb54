"""Decode attention written with torch's operators: what the lean path runs where the CPU kernel (model/native.py)
is not built or not proven, and on a GPU. The engine's other parity tests run the kernel on the CPU, so this one holds
the torch path to PEFT's tokens and log-probabilities on its own."""

from __future__ import annotations

import dataclasses

from prompt_server.engine.types import GenerateRequest
from tests.engine.conftest import World, run_engine
from tests.tiny import VARIANTS


def test_torch_attention_rows_match_peft(llama_world):
    """The decode attention the kernel replaces on the CPU, and still runs elsewhere: PEFT's tokens and
    log-probabilities for every kind, mixed in one batch, joining a running batch and beside a chunked prefill."""
    loaded = llama_world.loaded
    world: World = dataclasses.replace(
        llama_world, loaded=dataclasses.replace(loaded, plan=dataclasses.replace(loaded.plan, native_kernels=False)))
    long = "Once upon a time there was a little cat who lived in a small house by the river, and it was glad."
    cases = [(a, "the cat sat on the mat") for a in (None, *VARIANTS)]

    async def go(engine):
        assert engine.runner.decode_kernel is None
        first = engine.submit(GenerateRequest(prompt="hello world", adapter_id="prefix", max_new_tokens=16,
                                              ignore_eos=True))
        late, seen = [], 0
        async for _ in first:
            seen += 1
            if seen == 3:  # joining the running batch, one of them chunk-prefilled
                late = [engine.submit(GenerateRequest(prompt=p, adapter_id=a, max_new_tokens=6,
                                                      ignore_eos=True)) for a, p in cases + [("p_tuning_lstm", long)]]
        return await first.result(), [await h.result() for h in late]

    first, late = run_engine(world, go, max_step_tokens=16)
    assert [t.id for t in first.tokens] == world.oracle("prefix", "hello world", 16)
    for (adapter_id, prompt), result in zip(cases + [("p_tuning_lstm", long)], late):
        world.check_logprobs(adapter_id, prompt, result)
    assert len(loaded.tokenizer(long).input_ids) > 16

