"""The engine against PEFT: mixed batches, joining mid-flight, seeds, cancellation, stopping, hot swap."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import pytest
import torch

from prompt_server.config import Settings
from prompt_server.engine import admission
from prompt_server.engine.engine import STEP_TIME_STATS, Engine
from prompt_server.engine.types import (
    AdapterNotFound,
    ClassifyRequest,
    EngineStopped,
    GenerateRequest,
    InvalidRequest,
    QueueFull,
    SamplingParams,
)
from prompt_server.model import omp
from prompt_server.model.batch import PrefillInputs
from tests.engine.conftest import put_dir, run_engine
from tests.threads import name_this_thread, named
from tests.tiny import VARIANTS

PROMPTS = ["the cat sat on the mat", "hello world", "once upon a time there was", "a b c"]


def greedy(prompt, adapter_id=None, n=8, **kw) -> GenerateRequest:
    return GenerateRequest(prompt=prompt, adapter_id=adapter_id, max_new_tokens=n, ignore_eos=True, **kw)


def test_mixed_batch_matches_peft_for_every_row(world):
    cases = [(a, p) for a in (None, *VARIANTS) for p in PROMPTS[:2]]

    async def go(engine):
        handles = [engine.submit(greedy(p, a)) for a, p in cases]
        return [await h.result() for h in handles]

    results = run_engine(world, go)
    for (adapter_id, prompt), result in zip(cases, results):
        assert [t.id for t in result.tokens] == world.oracle(adapter_id, prompt, 8), (adapter_id, prompt)
        assert result.finish_reason == "length"
        assert result.prompt_tokens == len(world.loaded.tokenizer(prompt).input_ids)


def test_rows_joining_a_running_batch_match_running_alone(world):

    async def go(engine):
        first = engine.submit(greedy(PROMPTS[2], "prefix", n=24))
        early = [engine.submit(greedy(PROMPTS[0], "p_tuning_lstm", n=16))]
        seen = 0
        late = []
        async for event in first:
            seen += 1
            if seen == 4:  # the batch is running: newcomers of other kinds join it now
                late = [engine.submit(greedy(PROMPTS[1], v, n=10)) for v in ("prompt_tuning", "prefix_projection")]
                late.append(engine.submit(greedy(PROMPTS[3], None, n=10)))
        return await first.result(), [await h.result() for h in early + late]

    first, others = run_engine(world, go)
    assert [t.id for t in first.tokens] == world.oracle("prefix", PROMPTS[2], 24)
    expected = [
        world.oracle("p_tuning_lstm", PROMPTS[0], 16),
        world.oracle("prompt_tuning", PROMPTS[1], 10),
        world.oracle("prefix_projection", PROMPTS[1], 10),
        world.oracle(None, PROMPTS[3], 10),
    ]
    assert [[t.id for t in r.tokens] for r in others] == expected


def test_prefills_that_allocate_every_layer_at_once_match_peft(llama_world, monkeypatch):
    """As on a GPU (LlamaRunner.whole_cache, torch's attention): a prefill's cache is allocated for all layers at
    once, each soft prompt and cached head copied once for all its layers (PrefillInputs.all_layers), and prompt
    heads are kept from it in one slice per span (admission.columns). PEFT's tokens and log-probabilities for every
    kind, with rows joining a running batch, a prompt prefilled in chunks, and the same prompts again from cached
    heads."""
    world = dataclasses.replace(llama_world, loaded=dataclasses.replace(
        llama_world.loaded, plan=dataclasses.replace(llama_world.loaded.plan, native_kernels=False)))
    allocated = []
    all_layers = PrefillInputs.all_layers

    def spy(self, layers, columns, like):
        allocated.append(layers)
        return all_layers(self, layers, columns, like)

    monkeypatch.setattr(PrefillInputs, "all_layers", spy)
    kept_from = []  # whether each head or chunk kept was sliced from a cache allocated for all layers
    columns = admission.columns

    def columns_spy(kv, row, spans):
        kept_from.append(kv.whole is not None)
        return columns(kv, row, spans)

    monkeypatch.setattr(admission, "columns", columns_spy)
    long = "Once upon a time there was a little cat who lived in a small house by the river, and it was glad."
    cases = [(a, f"the cat sat on the mat {i}", 6) for i, a in enumerate((None, *VARIANTS))] + [("prefix", long, 5)]

    async def go(engine):
        engine.runner.whole_cache = True
        first = engine.submit(greedy(PROMPTS[2], "prompt_tuning", n=16))
        late, seen = [], 0
        async for _ in first:
            seen += 1
            if seen == 3:
                late = [engine.submit(greedy(p, a, n=n)) for a, p, n in cases]
        results = [await first.result()] + [await h.result() for h in late]
        before = engine.stats()["prefix_cache_reused_tokens"]
        again = [await engine.submit(greedy(p, a, n=n)).result() for a, p, n in cases]
        return results, again, engine.stats()["prefix_cache_reused_tokens"] - before

    results, again, reused = run_engine(world, go, max_step_tokens=16)
    assert [t.id for t in results[0].tokens] == world.oracle("prompt_tuning", PROMPTS[2], 16)
    for (adapter_id, prompt, _), result, repeat in zip(cases, results[1:], again):
        world.check_logprobs(adapter_id, prompt, result)
        world.check_logprobs(adapter_id, prompt, repeat)
    assert len(world.loaded.tokenizer(long).input_ids) > 16  # chunked
    assert allocated and set(allocated) == {len(world.loaded.model.model.layers)}
    assert kept_from and all(kept_from)  # heads, and the long prompt's chunks, sliced from the whole cache
    assert reused > 0  # the repeats started from those heads


def test_newcomers_take_freed_slots_without_copying_the_running_batch(llama_world):
    """Rows that finish free their slots; newcomers that fit are written into them, and the cache is laid out
    again only when a newcomer is wider than the columns left of the shared one."""
    world = llama_world
    prompt = PROMPTS[0]

    async def go(engine):
        long = engine.submit(greedy(prompt, "prompt_tuning", n=40))
        short = [engine.submit(greedy(prompt, "prompt_tuning", n=4)) for _ in range(3)]
        first = [await h.result() for h in short]  # three slots free, the long row still running
        copies = [engine.stats().get("cache_relayouts", 0)]  # the batch may have grown to 4 slots: one copy
        joined = [engine.submit(greedy(prompt, "prompt_tuning", n=6)) for _ in range(3)]
        second = [await h.result() for h in joined]
        copies.append(engine.stats().get("cache_relayouts", 0))
        wide = await engine.submit(greedy(PROMPTS[2] * 6, None, n=3)).result()  # wider than the batch
        copies.append(engine.stats().get("cache_relayouts", 0))
        return await long.result(), first + second, wide, copies

    long, short, wide, copies = run_engine(world, go, max_batch_size=4)
    assert copies[0] <= 1  # the first requests arrived in one step (no copy) or two (the slots grew once)
    assert copies[1] == copies[0]  # three newcomers took the freed slots: nothing copied
    assert copies[2] == copies[1] + 1  # the wide newcomer: the cache laid out again, once
    assert [t.id for t in long.tokens] == world.oracle("prompt_tuning", prompt, 40)
    assert [[t.id for t in r.tokens] for r in short] == [world.oracle("prompt_tuning", prompt, 4)] * 3 + [
        world.oracle("prompt_tuning", prompt, 6)] * 3
    assert [t.id for t in wide.tokens] == world.oracle(None, PROMPTS[2] * 6, 3)


def test_newcomers_the_free_slots_cannot_hold_take_the_running_row_into_their_cache(llama_world):
    """A wave of newcomers with no free slots for them: their prefill gets a cache with room for the running row
    (a free slot, and lead columns for its longer history), and the running row is copied into it after the step.
    The newcomers' keys/values are written once, no cache is laid out again, and every row decodes what PEFT
    decodes for it alone. The engine is stepped by hand, so that the wave arrives in one step."""
    world = llama_world
    engine = Engine(world.loaded, world.registry, Settings())
    engine.ready = True  # no engine thread: the test steps it
    cases = [("prompt_tuning", PROMPTS[1]), ("prefix", PROMPTS[0]), ("p_tuning_mlp", PROMPTS[3]), (None, PROMPTS[1])]

    async def go():
        first = engine.submit(greedy(PROMPTS[0], "prompt_tuning", n=10))
        with torch.inference_mode():
            for _ in range(6):
                engine._step()
            running = engine._batch
            assert len(running) == 1 and len(running.rows) == 1  # one slot, no room for the wave
            width = running.kv.width - running.start
            late = [engine.submit(greedy(p, a, n=6)) for a, p in cases]
            engine._step()
            batch = engine._batch
            assert batch is not running  # the newcomers' cache became the batch's
            assert batch.sequences()[-1] is running.sequences()[0]  # the running row joined last, in the free slot
            assert len(batch) == len(batch.rows) == 5 and batch.kv.batch_size == 5
            assert batch.kv.width - batch.start == width + 1  # its history and this step's token, right-aligned
            assert not batch.mask[:4, batch.start].any()  # the newcomers are shorter: lead columns in front of them
            assert engine.stats()["cache_relayouts"] == 0
            while engine._batch is not None:
                engine._step()
        return await first.result(), [await h.result() for h in late]

    first, late = asyncio.run(go())
    assert [t.id for t in first.tokens] == world.oracle("prompt_tuning", PROMPTS[0], 10)
    assert [[t.id for t in r.tokens] for r in late] == [world.oracle(a, p, 6) for a, p in cases]
    assert engine.stats()["cache_relayouts"] == 0


def test_newcomer_groups_of_one_step_grow_the_batch_once(llama_world):
    """A wave of newcomers of very different lengths arrives in one step: they are prefilled in groups of similar
    length, each more rows than the batch's free slots and wider than the last. The batch's cache is laid out once
    for all of them (RunningBatch.make_room), not once per group, and every row decodes what PEFT decodes for it
    alone."""
    world = llama_world
    engine = Engine(world.loaded, world.registry, Settings())
    engine.ready = True  # no engine thread: the test steps it
    cases = [(None, PROMPTS[3]), ("prefix", PROMPTS[3]), (None, PROMPTS[2] * 4), ("prompt_tuning", PROMPTS[2] * 4),
             (None, PROMPTS[2] * 9)]

    async def go():
        first = engine.submit(greedy(PROMPTS[0], None, n=8))
        with torch.inference_mode():
            engine._step()
            running = engine._batch
            assert len(running) == len(running.rows) == 1
            late = [engine.submit(greedy(p, a, n=5)) for a, p in cases]
            groups = []
            prepare = engine.layout.prepare

            def counted(seqs):
                groups.append(len(seqs))
                return prepare(seqs)

            engine.layout.prepare = counted
            engine._step()
            assert len(groups) >= 3  # three groups, each needing more room than the last
            assert engine._batch is running and len(running) == 6
            assert engine.stats()["cache_relayouts"] == 1  # once for all of them
            while engine._batch is not None:
                engine._step()
        return await first.result(), [await h.result() for h in late]

    first, late = asyncio.run(go())
    assert [t.id for t in first.tokens] == world.oracle(None, PROMPTS[0], 8)
    assert [[t.id for t in r.tokens] for r in late] == [world.oracle(a, p, 5) for a, p in cases]


def test_newcomers_that_cannot_join_fail_and_the_running_rows_go_on(llama_world, monkeypatch):
    """Room for a step's newcomer groups cannot be made (an allocation fails, say): those newcomers fail with the
    reason, as a failed prefill does, instead of being left waiting; the running row decodes on as PEFT does, and the
    engine serves the next request."""
    from prompt_server.engine.batch import RunningBatch
    from prompt_server.engine.types import GenerationFailed

    world = llama_world
    engine = Engine(world.loaded, world.registry, Settings())
    engine.ready = True  # no engine thread: the test steps it
    cases = [(None, PROMPTS[3]), ("prefix", PROMPTS[2] * 4), (None, PROMPTS[2] * 9)]

    def refuse(self, parts, max_rows, max_tokens):
        raise RuntimeError("injected fault")

    async def go():
        first = engine.submit(greedy(PROMPTS[0], None, n=8))
        with torch.inference_mode():
            engine._step()
            late = [engine.submit(greedy(p, a, n=5)) for a, p in cases]
            with monkeypatch.context() as m:
                m.setattr(RunningBatch, "make_room", refuse)
                engine._step()
            assert len(engine._batch) == 1 and not engine._prefilling
            while engine._batch is not None:
                engine._step()
            for h in late:
                with pytest.raises(GenerationFailed, match="prefill failed: injected fault"):
                    await h.result()
            again = engine.submit(greedy(PROMPTS[3], None, n=5))
            while engine._batch is not None or engine._has_work():
                engine._step()
        return await first.result(), await again.result()

    first, again = asyncio.run(go())
    assert [t.id for t in first.tokens] == world.oracle(None, PROMPTS[0], 8)
    assert [t.id for t in again.tokens] == world.oracle(None, PROMPTS[3], 5)


def test_newcomers_much_shorter_than_the_running_row_join_its_batch_as_before(llama_world):
    """Running rows more than twice as wide as the newcomers: the newcomers' prefill would attend over that width,
    so no room is made; the batch's cache is laid out again for more slots (one copy) and the newcomers are written
    into it. Every row still decodes what PEFT decodes for it alone."""
    world = llama_world
    engine = Engine(world.loaded, world.registry, Settings())
    engine.ready = True  # no engine thread: the test steps it
    long_prompt = PROMPTS[2] * 6
    cases = [(None, PROMPTS[3]), ("prefix", PROMPTS[3])]

    async def go():
        first = engine.submit(greedy(long_prompt, None, n=8))
        with torch.inference_mode():
            for _ in range(2):
                engine._step()
            running = engine._batch
            assert len(running) == len(running.rows) == 1
            late = [engine.submit(greedy(p, a, n=5)) for a, p in cases]
            engine._step()
            assert engine._batch is running  # the newcomers joined the running batch
            assert len(running) == 3 and running.sequences()[0] is not None
            assert engine.stats()["cache_relayouts"] == 1  # its cache laid out again for more slots
            while engine._batch is not None:
                engine._step()
        return await first.result(), [await h.result() for h in late]

    first, late = asyncio.run(go())
    assert [t.id for t in first.tokens] == world.oracle(None, long_prompt, 8)
    assert [[t.id for t in r.tokens] for r in late] == [world.oracle(a, p, 5) for a, p in cases]


def test_same_seed_same_text_whatever_the_batch(world):
    params = SamplingParams(do_sample=True, temperature=1.3, top_k=50, top_p=0.95, seed=1234)
    req = GenerateRequest(prompt=PROMPTS[0], adapter_id="p_tuning_mlp", max_new_tokens=12, sampling=params,
                          ignore_eos=True)

    async def alone(engine):
        return await engine.submit(req).result()

    async def crowded(engine):
        others = [engine.submit(greedy(p, v, n=12)) for v in VARIANTS for p in PROMPTS[:2]]
        noisy = [engine.submit(GenerateRequest(prompt=PROMPTS[1], max_new_tokens=12, ignore_eos=True,
                                               sampling=SamplingParams(do_sample=True, seed=s))) for s in range(3)]
        mine = engine.submit(req)
        await asyncio.gather(*(h.result() for h in others + noisy))
        return await mine.result()

    a = run_engine(world, alone)
    b = run_engine(world, crowded)
    assert a.seed == b.seed == 1234
    assert [t.id for t in a.tokens] == [t.id for t in b.tokens]
    c = run_engine(world, lambda e: _one(e, GenerateRequest(
        prompt=PROMPTS[0], adapter_id="p_tuning_mlp", max_new_tokens=12, ignore_eos=True,
        sampling=SamplingParams(do_sample=True, temperature=1.3, top_k=50, top_p=0.95, seed=99))))
    assert [t.id for t in c.tokens] != [t.id for t in a.tokens]  # the seed matters


async def _one(engine, req):
    return await engine.submit(req).result()


def test_cancelling_one_row_leaves_the_others_unchanged(world):

    async def go(engine):
        keep = [engine.submit(greedy(PROMPTS[0], "prefix", n=20)), engine.submit(greedy(PROMPTS[1], "prompt_tuning", n=20))]
        victim = engine.submit(greedy(PROMPTS[2], "p_tuning_lstm", n=200))
        n = 0
        async for _ in victim:
            n += 1
            if n == 3:
                victim.cancel()
        results = [await h.result() for h in keep], await victim.result()
        for _ in range(200):  # the loop drops finished rows right after their last token is handed over
            if engine.stats()["running"] == 0:
                break
            await asyncio.sleep(0.01)
        return (*results, engine.stats())

    kept, cancelled, stats = run_engine(world, go)
    assert cancelled.finish_reason == "cancelled"
    assert len(cancelled.tokens) < 200
    assert [t.id for t in kept[0].tokens] == world.oracle("prefix", PROMPTS[0], 20)
    assert [t.id for t in kept[1].tokens] == world.oracle("prompt_tuning", PROMPTS[1], 20)
    assert stats["running"] == 0


def test_steps_and_their_time_are_counted_by_kind(llama_world):
    """stats() splits the engine's steps and their wall time into steps that ran prompt tokens and decode-only ones:
    a request alone for 5 tokens is one prefill step (its first token) and 4 decode-only steps, a classification one
    prefill step. The counters exist from the start."""

    async def go(engine):
        before = engine.stats()
        start = time.perf_counter()
        await engine.submit(greedy(PROMPTS[0], "prompt_tuning", n=5)).result()
        await engine.classify(ClassifyRequest(inputs=[PROMPTS[1]], labels=["yes", "no"]))
        for _ in range(200):  # a step is counted once it has handed out its tokens
            stats = engine.stats()
            if stats["decode_only_steps"] >= 4 and stats["prefill_steps"] >= 2:
                break
            await asyncio.sleep(0.01)
        return before, engine.stats(), time.perf_counter() - start

    before, after, wall = run_engine(llama_world, go)
    assert all(before[k] == 0 for k in STEP_TIME_STATS)
    assert after["prefill_steps"] == 2 and after["decode_only_steps"] == 4 and after["steps"] == 4
    assert after["prefill_step_seconds"] > 0 and after["decode_only_step_seconds"] > 0
    assert after["prefill_step_seconds"] + after["decode_only_step_seconds"] < wall


def test_finish_reasons_eos_stop_and_length(llama_world):
    world = llama_world
    tok = world.loaded.tokenizer
    reference = world.oracle(None, PROMPTS[0], 8)
    stop_text = tok.decode(reference[2:4])

    async def go(engine):
        length = await engine.submit(greedy(PROMPTS[0], n=8)).result()
        stop = await engine.submit(GenerateRequest(prompt=PROMPTS[0], max_new_tokens=8, stop=[stop_text],
                                                   ignore_eos=True)).result()
        return length, stop

    length, stop = run_engine(world, go)
    assert length.finish_reason == "length" and len(length.tokens) == 8
    assert length.text == tok.decode(reference, skip_special_tokens=True)
    assert stop.finish_reason == "stop_sequence"
    assert stop.text.endswith(stop_text) or stop_text in stop.text
    assert len(stop.tokens) <= 4


def test_eos_ends_generation_unless_ignored(llama_world):
    world = llama_world
    reference = world.oracle(None, PROMPTS[1], 6)
    first = reference[0]
    # declare the first greedy token an end-of-sequence token for this engine only
    async def go(engine):
        engine.eos_ids = frozenset({first})
        stopped = await engine.submit(GenerateRequest(prompt=PROMPTS[1], max_new_tokens=6)).result()
        ignored = await engine.submit(greedy(PROMPTS[1], n=6)).result()
        return stopped, ignored

    stopped, ignored = run_engine(world, go)
    assert stopped.finish_reason == "eos_token" and [t.id for t in stopped.tokens] == [first]
    assert [t.id for t in ignored.tokens] == reference


def test_streamed_text_adds_up_to_the_final_text(llama_world):
    async def go(engine):
        handle = engine.submit(greedy(PROMPTS[2], "prefix", n=16))
        deltas, final = [], None
        async for event in handle:
            if hasattr(event, "token"):
                deltas.append(event.text)
            else:
                final = event
        return deltas, final

    deltas, final = run_engine(llama_world, go)
    assert len(deltas) == 16
    assert "".join(deltas) == final.text


def test_replacing_an_adapter_does_not_disturb_requests_already_admitted(llama_world, tmp_path):
    world = llama_world
    registry = world.registry
    put_dir(registry, "swap", world.dirs["prefix"])
    v1 = registry.get("swap").version

    async def go(engine):
        old = engine.submit(greedy(PROMPTS[0], "swap", n=20))
        n = 0
        async for _ in old:
            n += 1
            if n == 2:
                put_dir(registry, "swap", world.dirs["prompt_tuning"])  # replace mid-flight
                break
        new = engine.submit(greedy(PROMPTS[0], "swap", n=8))
        deleted_during = engine.submit(greedy(PROMPTS[1], "swap", n=8))
        registry.delete("swap")
        with pytest.raises(AdapterNotFound):
            engine.submit(greedy(PROMPTS[0], "swap", n=8))
        return await old.result(), await new.result(), await deleted_during.result()

    old, new, during = run_engine(world, go)
    assert old.adapter_version == v1
    assert new.adapter_version == v1 + 1
    assert [t.id for t in old.tokens] == world.oracle("prefix", PROMPTS[0], 20)
    assert [t.id for t in new.tokens] == world.oracle("prompt_tuning", PROMPTS[0], 8)
    assert [t.id for t in during.tokens] == world.oracle("prompt_tuning", PROMPTS[1], 8)


@pytest.mark.parametrize(
    "req, message",
    [
        (GenerateRequest(prompt="hi", max_new_tokens=0), "max_new_tokens must be between 1 and 1024, got 0"),
        (GenerateRequest(prompt="hi", max_new_tokens=5000), "max_new_tokens must be between 1 and 1024, got 5000"),
        (GenerateRequest(prompt="", max_new_tokens=5), "inputs: must not be empty"),
        (GenerateRequest(prompt="hi", sampling=SamplingParams(do_sample=True, temperature=0.0)),
         "temperature must be > 0, got 0.0"),
        (GenerateRequest(prompt="hi", sampling=SamplingParams(top_p=1.5)), "top_p must be in (0, 1], got 1.5"),
        (GenerateRequest(prompt="hi", sampling=SamplingParams(top_k=-1)), "top_k must be >= 0, got -1"),
        (GenerateRequest(prompt="hi", sampling=SamplingParams(repetition_penalty=0)),
         "repetition_penalty must be > 0, got 0"),
        (GenerateRequest(prompt="hi", stop=[""]), "stop: stop sequences must not be empty"),
        (GenerateRequest(prompt=[10**9]), "inputs: token id 1000000000 is outside the vocabulary"),
        (GenerateRequest(prompt="hello " * 100), "tokens exceed max_input_tokens 50"),
    ],
)
def test_bad_requests_are_refused_with_a_message_naming_the_field(llama_world, req, message):
    async def go(engine):
        with pytest.raises(InvalidRequest) as err:
            engine.submit(req)
        return str(err.value)

    assert message in run_engine(llama_world, go, max_input_tokens=50)


def test_unknown_adapter_full_queue_and_stopped_engine(llama_world):
    async def go(engine):
        with pytest.raises(AdapterNotFound, match="adapter 'nope' not found"):
            engine.submit(greedy("hi", "nope"))
        handles = []
        with pytest.raises(QueueFull):
            for _ in range(12):
                handles.append(engine.submit(greedy("hi", n=50)))
        for h in handles:
            h.cancel()
        await asyncio.gather(*(h.result() for h in handles))
        engine.stop()
        with pytest.raises(EngineStopped):
            engine.submit(greedy("hi"))

    run_engine(llama_world, go, max_queue=2, max_batch_size=1)


def test_repetition_penalty_changes_the_greedy_choice_like_hf(llama_world):
    world = llama_world
    tok = world.loaded.tokenizer
    ids = tok(PROMPTS[0], return_tensors="pt").input_ids
    import torch

    with torch.inference_mode():
        out = world.loaded.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=10,
                                          do_sample=False, repetition_penalty=1.8, eos_token_id=None,
                                          pad_token_id=tok.pad_token_id)
    expected = out[0, ids.shape[1]:].tolist()
    got = run_engine(world, lambda e: _one(e, greedy(PROMPTS[0], n=10,
                                                      sampling=SamplingParams(repetition_penalty=1.8))))
    assert [t.id for t in got.tokens] == expected


def test_prefill_logprobs_match_the_model(llama_world):
    import torch

    world = llama_world
    tok = world.loaded.tokenizer
    ids = tok(PROMPTS[2]).input_ids
    got = run_engine(world, lambda e: _one(e, greedy(PROMPTS[2], n=2, prefill_logprobs=True)))
    assert [t.id for t in got.prefill] == ids
    with torch.inference_mode():
        logits = world.loaded.model(torch.tensor([ids], device=world.loaded.device)).logits[0].log_softmax(-1)
    expected = [logits[i, ids[i + 1]].item() for i in range(len(ids) - 1)]
    assert got.prefill[1:] and all(abs(t.logprob - e) < 1e-4 for t, e in zip(got.prefill[1:], expected))
    assert abs(got.tokens[0].logprob - logits[-1].max().item()) < 1e-4


def test_newcomers_are_prefilled_in_groups_of_similar_length():
    from types import SimpleNamespace

    from prompt_server.engine.batch import length_groups

    seqs = [SimpleNamespace(embed_len=n) for n in (40, 3, 12, 30, 5, 14, 41, 9)]
    groups = [[s.embed_len for s in g] for g in length_groups(seqs)]
    assert groups == [[3, 5, 9, 12, 14], [30], [40, 41]]
    assert sorted(n for g in groups for n in g) == sorted(s.embed_len for s in seqs)


def test_extreme_sampling_settings_do_not_disturb_other_rows(world):
    wild = [
        GenerateRequest(prompt=PROMPTS[0], max_new_tokens=6, ignore_eos=True,
                        sampling=SamplingParams(do_sample=True, temperature=1e-30, seed=1)),
        GenerateRequest(prompt=PROMPTS[1], max_new_tokens=6, ignore_eos=True,
                        sampling=SamplingParams(do_sample=True, repetition_penalty=1e-38, seed=2)),
    ]

    async def go(engine):
        handles = [engine.submit(r) for r in wild] + [engine.submit(greedy(PROMPTS[2], "prefix", n=6))]
        return [await h.result() for h in handles]

    tiny_t, tiny_penalty, normal = run_engine(world, go)
    # a temperature near zero is greedy
    assert [t.id for t in tiny_t.tokens] == world.oracle(None, PROMPTS[0], 6)
    assert len(tiny_penalty.tokens) == 6
    assert [t.id for t in normal.tokens] == world.oracle("prefix", PROMPTS[2], 6)


def test_a_failed_prefill_fails_only_its_own_requests(llama_world):
    from prompt_server.engine.types import GenerationFailed

    world = llama_world
    poison = world.loaded.tokenizer("zzz zzz zzz zzz zzz zzz zzz zzz zzz zzz zzz zzz").input_ids

    async def go(engine):
        real = engine.runner.step

        def step(decode, groups):  # every forward of the lean runner goes through step
            if any(row[-len(poison):].tolist() == poison for inputs, _ in groups for row in inputs.ids):
                raise RuntimeError("injected fault")
            return real(decode, groups)

        engine.runner.step = step
        good = engine.submit(greedy(PROMPTS[0], "p_tuning_mlp", n=8))
        bad = engine.submit(GenerateRequest(prompt=poison, max_new_tokens=8))
        with pytest.raises(GenerationFailed, match="prefill failed: injected fault"):
            await bad.result()
        after = engine.submit(greedy(PROMPTS[1], n=4))
        return await good.result(), await after.result()

    good, after = run_engine(world, go)
    assert [t.id for t in good.tokens] == world.oracle("p_tuning_mlp", PROMPTS[0], 8)
    assert [t.id for t in after.tokens] == world.oracle(None, PROMPTS[1], 4)


def test_a_failed_decode_step_fails_the_running_rows_and_the_engine_goes_on(llama_world):
    from prompt_server.engine.types import GenerationFailed

    world = llama_world

    async def go(engine):
        real = engine.runner.step
        state = {"n": 0, "bad": None}

        def step(decode, groups):  # the third decode poisons that batch's cache: every later step over it fails
            if decode is not None:
                state["n"] += 1
                if state["n"] == 3:
                    state["bad"] = decode.kv
                if decode.kv is state["bad"]:
                    raise RuntimeError("injected fault")
            return real(decode, groups)

        engine.runner.step = step
        victims = [engine.submit(greedy(p, n=10)) for p in PROMPTS[:2]]
        for v in victims:
            with pytest.raises(GenerationFailed, match="generation failed: injected fault"):
                await v.result()
        return await engine.submit(greedy(PROMPTS[2], "prefix", n=6)).result()

    later = run_engine(world, go)
    assert [t.id for t in later.tokens] == world.oracle("prefix", PROMPTS[2], 6)


def test_cancelled_waiting_requests_do_not_fill_the_queue(llama_world):
    async def go(engine):
        running = engine.submit(greedy(PROMPTS[0], n=40))
        await running.__aiter__().__anext__()  # admitted: it no longer waits in the queue
        waiting = [engine.submit(greedy(PROMPTS[1], n=5)) for _ in range(2)]
        for w in waiting:
            w.cancel()
        more = [engine.submit(greedy(PROMPTS[1], n=3)) for _ in range(2)]  # would be a 429 without the purge
        results = [await h.result() for h in waiting + more]
        running.cancel()
        await running.result()
        return results

    results = run_engine(llama_world, go, max_queue=2, max_batch_size=1)
    assert [r.finish_reason for r in results] == ["cancelled", "cancelled", "length", "length"]


def test_admission_respects_the_cache_memory_budget(llama_world):
    async def go(engine):
        order = []

        async def watch(name, handle):
            async for event in handle:
                order.append((name, "token" if hasattr(event, "token") else "done"))

        a = engine.submit(greedy(PROMPTS[2], n=30))
        b = engine.submit(greedy(PROMPTS[0], n=30))
        await asyncio.gather(watch("a", a), watch("b", b))
        return order

    # one row of ~40 columns fits in 60 tokens of cache, two do not: b waits until a is done
    order = run_engine(llama_world, go, max_batch_tokens=60)
    assert order.index(("a", "done")) < order.index(("b", "token"))


def test_prefill_chunks_bound_the_padded_size():
    from prompt_server.engine.batch import MAX_PREFILL_TOKENS, prefill_chunks
    from prompt_server.model.batch import PrefillRow

    rows = [PrefillRow(ids=[1] * n) for n in (10, 4000, 4000, 20, 9000)]
    chunks = prefill_chunks(rows)
    assert MAX_PREFILL_TOKENS == 8192
    assert [[len(r.ids) for r in c] for c in chunks] == [[10, 4000], [4000, 20], [9000]]
    assert [r for c in chunks for r in c] == rows


def test_bfloat16_serves_every_kind(tiny_llama_dir, tmp_path):
    import math

    import torch

    from prompt_server.adapters.registry import AdapterRegistry
    from prompt_server.config import Settings
    from prompt_server.engine.engine import Engine
    from prompt_server.model.loader import load_model
    from tests.engine.conftest import put_dir
    from tests.tiny import make_peft, save_peft

    loaded = load_model(tiny_llama_dir, device="cpu", dtype="bfloat16", progress=False)
    registry = AdapterRegistry(loaded.spec, device="cpu", dtype=torch.bfloat16)
    for i, variant in enumerate(VARIANTS):
        put_dir(registry, variant, save_peft(make_peft(tiny_llama_dir, variant, seed=i), tmp_path / variant))
    assert registry.get("prefix").prefix.dtype == torch.bfloat16
    engine = Engine(loaded, registry, Settings())
    engine.start()
    try:
        async def go():
            handles = [engine.submit(greedy(PROMPTS[0], v, n=5)) for v in (None, *VARIANTS)]
            return [await h.result() for h in handles]

        results = asyncio.run(go())
    finally:
        engine.stop()
    assert all(len(r.tokens) == 5 and all(math.isfinite(t.logprob) for t in r.tokens) for r in results)


def test_a_soft_prompt_that_cannot_be_computed_fails_only_its_own_requests(llama_world):
    """The virtual-token keys/values of one adapter fail to compute (injected): its requests fail, while requests
    of other adapters prefilled in the same group go on, and so does the engine."""
    from prompt_server.engine.types import GenerationFailed

    world = llama_world

    async def go(engine):
        cache = engine.prompt_kv
        real = cache._compute

        def compute(adapters):
            if any(a.id == "prompt_tuning" for a in adapters):
                raise RuntimeError("injected fault")
            return real(adapters)

        cache._compute = compute
        # same prompt, so the rows fall into one length group and one prefill
        bad = engine.submit(greedy(PROMPTS[0], "prompt_tuning", n=6))
        good = [engine.submit(greedy(PROMPTS[0], a, n=6)) for a in ("p_tuning_mlp", "prefix", None)]
        with pytest.raises(GenerationFailed, match="injected fault"):
            await bad.result()
        return [await h.result() for h in good]

    results = run_engine(world, go)
    for adapter_id, result in zip(("p_tuning_mlp", "prefix", None), results):
        assert [t.id for t in result.tokens] == world.oracle(adapter_id, PROMPTS[0], 6), adapter_id


@pytest.mark.parametrize("settings", [{}, {"max_batch_size": 4, "max_step_tokens": 16, "prefix_cache_bytes": 40000}])
def test_rows_on_one_adapter_or_one_cached_head_read_them_where_they_were_copied_from(llama_world, monkeypatch,
                                                                                    settings):
    """Rows that share their adapter's soft prompt or prefix, or a cached prompt head, decode reading them from the
    one tensor they were copied from (model/forward.py _redirects, the CPU decode kernel): the prefix and a head the
    prefix tree split in two (three pieces), the prefix and a head, the soft prompt alone, the head alone. The tokens
    are those of reading the copies (log-probabilities within 1e-5), and PEFT's; also with rows joining a batch of 4
    slots and relaid out, prompts prefilled in chunks, and a prefix cache so small that it evicts heads running rows
    still stand behind."""
    from prompt_server.model import forward

    if llama_world.loaded.device.type != "cpu":
        pytest.skip("the decode kernel that reads shared pieces is the CPU's (model/native.py); on a GPU rows read "
                    "their own copies")
    tables = []
    redirects = forward._redirects

    def spy(*args):
        shared, table = redirects(*args)
        if table is not None:
            tables.append(table.clone())
        return shared, table

    monkeypatch.setattr(forward, "_redirects", spy)
    head = "once upon a time there was a little cat who"
    cases = [("prefix", head + " sat"), ("prefix", head + " ran"), ("prefix", "the cat sat on the mat"),
             ("prompt_tuning", PROMPTS[0]), ("prompt_tuning", PROMPTS[1]), (None, head + " slept"),
             (None, head + " woke"), ("p_tuning_mlp", head + " sang"), ("prefix", head + " ate fish now"),
             ("prefix", head + " ate fish too")]

    def serve(shared: bool):
        async def go(engine):
            assert engine.runner.reads_pieces
            engine.runner.reads_pieces = shared
            # the head, cached under each of them as a span of its own, then " ate" and " drank" after it
            for a in ("prefix", None, "p_tuning_mlp"):
                for end in (" ate fish", " drank milk"):
                    await engine.submit(greedy(head + end, a, n=2)).result()
            tables.clear()
            handles = [engine.submit(greedy(p, a, n=8)) for a, p in cases]
            return [await h.result() for h in handles]

        return run_engine(llama_world, go, **settings)

    copies = serve(False)
    assert not tables
    results = serve(True)
    for (adapter_id, prompt), result, copy in zip(cases, results, copies):
        # the same steps give the same bits; where scheduling differs between the two runs (which rows a step holds),
        # the products round differently, within 1e-6
        assert [t.id for t in result.tokens] == [t.id for t in copy.tokens], adapter_id
        torch.testing.assert_close(torch.tensor([t.logprob for t in result.tokens]),
                                   torch.tensor([t.logprob for t in copy.tokens]), atol=1e-5, rtol=0)
        llama_world.check_logprobs(adapter_id, prompt, result)
    assert tables, "no decode step read a shared piece"
    pieces = {sum(int(x) > -1 for x in row[1::2]) for table in tables for row in table}
    # rows reading their prefix and the two spans of their head, their prefix and their head, one piece (the
    # prompt-tuning rows' soft prompt; the rows without adapter on the cached head), none
    assert {2, 1, 0} <= pieces
    if not settings:  # (a batch of 4 slots may never hold both rows on the split head at once)
        assert 3 in pieces


@pytest.mark.skipif(omp._libgomp() is None or torch.get_num_threads() < 2,
                    reason="no libgomp, or one torch thread: no OpenMP workers")
def test_an_idle_engine_frees_its_threads_openmp_workers_and_the_next_step_starts_new_ones(llama_world, monkeypatch):
    """Between requests the engine thread's OpenMP pool goes (model/omp.py), so that it does not slow torch on
    other threads; the next request is served as the first was. The tiny model's products are too small for a
    parallel region, so each step also runs one that is not."""
    a = torch.randn(256, 512)
    pools: list[set[str]] = []
    name: list[str] = []  # the engine thread's, given at its first step: its OpenMP workers started later carry it

    def threads() -> set[str]:
        return named(name[0]) if name else set()

    async def go(engine):
        step = engine._step

        def stepped():
            if not name:
                name.append(name_this_thread("engine"))
            before = threads()
            a @ a.t()
            pools.append(threads() - before)  # this step's workers when it started the pool, else nothing
            step()

        monkeypatch.setattr(engine, "_step", stepped)
        gone, results = [], []
        for _ in range(2):
            results.append(await engine.submit(greedy(PROMPTS[0], "prompt_tuning", n=4)).result())
            for _ in range(200):  # the engine finds itself idle a moment after handing out the last token
                if not any(p & threads() for p in pools):
                    break
                await asyncio.sleep(0.01)
            gone.append(not any(p & threads() for p in pools))
        return results, gone

    results, gone = run_engine(llama_world, go)
    started = [p for p in pools if p]
    assert len(started) == 2 and all(len(p) == torch.get_num_threads() - 1 for p in started)  # one per request
    assert gone == [True, True]
    assert [t.id for t in results[0].tokens] == [t.id for t in results[1].tokens] == llama_world.oracle(
        "prompt_tuning", PROMPTS[0], 4)
