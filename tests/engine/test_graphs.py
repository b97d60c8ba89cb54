"""The engine with the decode step a CUDA graph records (model/graphs.py), run on the CPU without recording it: PEFT's
tokens and log-probabilities for every kind, with rows joining, leaving and chunk-prefilled, and graphs reused until
the cache or the width bucket changes. tests/engine/test_cuda.py records and replays it on a GPU."""

from __future__ import annotations

import dataclasses

import pytest

from prompt_server.engine.types import GenerateRequest
from prompt_server.model import graphs
from tests.engine.conftest import World, run_engine
from tests.tiny import VARIANTS


@pytest.mark.parametrize("whole", [False, True], ids=["layer-by-layer", "all-layers-at-once"])
def test_rows_decoded_by_the_static_step_match_peft(llama_world, monkeypatch, whole):
    """`whole`: prefills allocate every layer's cache at once, as they do on a GPU (LlamaRunner.whole_cache), so
    the recorded steps read and write views of one allocation."""
    monkeypatch.setattr(graphs, "WIDTH_BUCKET", 8)  # several buckets within a short generation
    loaded = llama_world.loaded
    world: World = dataclasses.replace(  # as on a GPU: torch's attention, no CPU kernels
        llama_world, loaded=dataclasses.replace(loaded, plan=dataclasses.replace(loaded.plan, native_kernels=False)))
    long = "Once upon a time there was a little cat who lived in a small house by the river, and it was glad."
    cases = [(a, "the cat sat on the mat", 6 + 2 * i) for i, a in enumerate((None, *VARIANTS))]
    cases.append(("p_tuning_lstm", long, 6))
    captured: list[tuple[object, tuple[int, int]]] = []

    async def go(engine):
        dg = graphs.DecodeGraphs(engine.runner, capture=graphs.uncaptured, after=1)
        capture_for = dg._capture_for

        def recording(kv, bufs, cols):
            captured.append((kv.keys[0], cols))
            return capture_for(kv, bufs, cols)

        dg._capture_for = recording
        engine.runner.graphs = dg
        engine.runner.whole_cache = whole
        first = engine.submit(GenerateRequest(prompt="hello world", adapter_id="prefix", max_new_tokens=24,
                                              ignore_eos=True))
        late, seen = [], 0
        async for _ in first:
            seen += 1
            if seen == 3:  # joining the running batch, one of them chunk-prefilled; they leave at different steps
                late = [engine.submit(GenerateRequest(prompt=p, adapter_id=a, max_new_tokens=n, ignore_eos=True))
                        for a, p, n in cases]
        return await first.result(), [await h.result() for h in late], engine.stats(), dg

    first, late, stats, dg = run_engine(world, go, max_step_tokens=16)
    assert [t.id for t in first.tokens] == world.oracle("prefix", "hello world", 24)
    for (adapter_id, prompt, n), result in zip(cases, late):
        assert len(result.tokens) == n
        world.check_logprobs(adapter_id, prompt, result)
    assert len(loaded.tokenizer(long).input_ids) > 16
    # graphs served most decode steps, each (cache, width bucket) captured once and replayed after
    assert dg.off is None
    assert len({(id(t), w) for t, w in captured}) == len(captured) == dg.captures >= 2
    assert dg.replays > 2 * dg.captures
    assert stats["decode_graph_steps"] == dg.replays and stats["decode_graph_captures"] == dg.captures
    assert stats["decode_graph_steps"] > stats["steps"] / 2
