"""On a CUDA GPU: float32 rows equal PEFT's batch-of-one tokens; bfloat16 rows choose what PEFT in bfloat16 would."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from prompt_server.engine.types import GenerateRequest
from tests.engine.conftest import build_world, run_engine
from tests.tiny import VARIANTS, save_tiny_arch

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

PROMPTS = ["the cat sat on the mat", "hello world how are you"]
CASES = [(a, PROMPTS[i % 2]) for i, a in enumerate((None, *VARIANTS, None))]
NEW_TOKENS = 8


def _serve(world):
    async def go(engine):
        handles = [engine.submit(GenerateRequest(prompt=p, adapter_id=a, max_new_tokens=NEW_TOKENS, ignore_eos=True))
                   for a, p in CASES]
        return [await h.result() for h in handles]

    return run_engine(world, go)


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "gpt2"])
def test_float32_on_cuda_matches_peft(model_type, tmp_path):
    world = build_world(save_tiny_arch(model_type, tmp_path / "m"), tmp_path / "a", device="cuda")
    assert world.loaded.device.type == "cuda"
    for (adapter_id, prompt), result in zip(CASES, _serve(world)):
        assert [t.id for t in result.tokens] == world.oracle(adapter_id, prompt, NEW_TOKENS), (adapter_id, prompt)


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_bfloat16_on_cuda_chooses_what_peft_would(model_type, tmp_path):
    """Teacher-forced: under PEFT in bfloat16, every token the server chose is (within rounding) the most likely."""
    world = build_world(save_tiny_arch(model_type, tmp_path / "m"), tmp_path / "a", device="cuda", dtype="bfloat16")
    assert world.loaded.dtype == torch.bfloat16
    tok = world.loaded.tokenizer
    for (adapter_id, prompt), result in zip(CASES, _serve(world)):
        prompt_ids = tok(prompt).input_ids
        chosen = [t.id for t in result.tokens]
        ids = torch.tensor([prompt_ids + chosen], device="cuda")
        model = world.peft[adapter_id] if adapter_id else world.loaded.model
        with torch.inference_mode():
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -ids.shape[1]:].float()
        logp = logits.log_softmax(-1)[len(prompt_ids) - 1: -1]  # [NEW_TOKENS, vocab]: what predicts each choice
        gap = logp.max(-1).values - logp.gather(-1, torch.tensor(chosen, device="cuda")[:, None]).squeeze(-1)
        assert float(gap.max()) < 0.1, (adapter_id, gap.tolist())
        assert all(torch.isfinite(torch.tensor([t.logprob for t in result.tokens]))), adapter_id


@pytest.mark.parametrize("model_type", ["t5", "bart"])
def test_an_encoder_decoder_model_in_float32_on_cuda_matches_peft(model_type, tmp_path):
    """Every soft-prompt kind on T5 and BART, mixed in one batch on the GPU, as PeftModelForSeq2SeqLM generates
    for each request alone."""
    from prompt_server.adapters.registry import AdapterRegistry
    from prompt_server.model.loader import load_model
    from tests.engine.conftest import put_dir
    from tests.tiny import make_peft, save_peft, save_tiny_seq2seq

    model_dir = save_tiny_seq2seq(model_type, tmp_path / "m")
    loaded = load_model(model_dir, device="cuda", dtype="float32", progress=False)
    registry = AdapterRegistry(loaded.spec, device=loaded.device, dtype=loaded.dtype)
    peft = {}
    for i, variant in enumerate(VARIANTS):
        pm = make_peft(model_dir, variant, task_type="SEQ_2_SEQ_LM", seed=i, num_virtual_tokens=3 + i)
        put_dir(registry, variant, save_peft(pm, tmp_path / variant))
        peft[variant] = pm.to("cuda")
    world = SimpleNamespace(loaded=loaded, registry=registry)
    tok = loaded.tokenizer
    for (adapter_id, prompt), result in zip(CASES, _serve(world)):
        ids = tok(prompt, return_tensors="pt").input_ids.to("cuda")
        model = peft[adapter_id] if adapter_id else loaded.model
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                                 do_sample=False)
        expected = out[0, 1:].tolist()
        got = [t.id for t in result.tokens]
        assert got[: len(expected)] == expected, (adapter_id, prompt)


def test_decode_steps_replay_cuda_graphs_proven_at_load_and_match_peft(tmp_path):
    """model/graphs.py on the GPU: the loader proves the recorded decode step against the model's own forward (and
    leaves it out when told to), and the engine then replays graphs for its decode steps, rows joining and leaving,
    one cache recorded for two width buckets, with PEFT's tokens."""
    from prompt_server.model.loader import load_model

    model_dir = save_tiny_arch("llama", tmp_path / "m")
    world = build_world(model_dir, tmp_path / "a", device="cuda")
    assert world.loaded.plan.cuda_graphs
    assert not load_model(model_dir, device="cuda", dtype="float32", progress=False,
                          cuda_graphs=False).plan.cuda_graphs
    long = 70  # past the first width bucket (64 columns)
    widths: dict[int, set[tuple[int, int]]] = {}  # per cache (its first keys tensor's id) the columns recorded
    held = []  # the caches, so that no id is reused while the test runs

    async def go(engine):
        dg = engine.runner.graphs
        assert dg is not None
        capture_for = dg._capture_for

        def recording(kv, bufs, cols):
            held.append(kv.keys[0])
            widths.setdefault(id(kv.keys[0]), set()).add(cols)
            return capture_for(kv, bufs, cols)

        dg._capture_for = recording
        first = engine.submit(GenerateRequest(prompt=PROMPTS[0], adapter_id="prefix", max_new_tokens=long,
                                              ignore_eos=True))
        late, seen = [], 0
        async for _ in first:
            seen += 1
            if seen == 4:
                late = [engine.submit(GenerateRequest(prompt=p, adapter_id=a, max_new_tokens=NEW_TOKENS + i,
                                                      ignore_eos=True)) for i, (a, p) in enumerate(CASES)]
        return await first.result(), [await h.result() for h in late], engine.stats(), dg.off

    first, late, stats, off = run_engine(world, go)
    assert off is None
    assert [t.id for t in first.tokens] == world.oracle("prefix", PROMPTS[0], long)
    for i, ((adapter_id, prompt), result) in enumerate(zip(CASES, late)):
        assert [t.id for t in result.tokens] == world.oracle(adapter_id, prompt, NEW_TOKENS + i), adapter_id
    assert max(len(w) for w in widths.values()) >= 2  # one cache recorded again past its first bucket
    assert stats["decode_graph_captures"] == sum(len(w) for w in widths.values())
    assert stats["decode_graph_steps"] > stats["steps"] / 2


def test_a_recording_that_fails_leaves_the_process_as_it_was(tmp_path, monkeypatch):
    """A recorded step that reads a value back to the host fails its recording: graphs go off, the thread is back
    on its stream, the allocator still frees and records, eager steps give the eager result, and a fresh recording
    afterwards replays what the eager step computes."""
    from prompt_server.model import graphs
    from prompt_server.model.forward import make_runner
    from prompt_server.model.loader import load_model
    from tests.model.test_graphs import _copy, _running, _step

    loaded = load_model(save_tiny_arch("llama", tmp_path / "m"), device="cuda", dtype="float32", progress=False,
                        cuda_graphs=False)
    runner = make_runner(loaded.model, "lean", graphs=True)
    assert runner.graphs is not None
    stream = torch.cuda.current_stream()
    kv, mask, ids, positions = _running(runner, slots=4)
    eager_kv = _copy(kv)
    step = graphs._static_step

    def host_read(*args):
        int(args[2].column)  # illegal while recording
        return step(*args)

    monkeypatch.setattr(graphs, "_static_step", host_read)
    runner.graphs = dg = graphs.DecodeGraphs(runner, after=0)
    got = _step(runner, kv, mask, ids, positions, None)
    assert dg.off is not None and dg.replays == 0
    assert torch.cuda.current_stream() == stream
    torch.cuda.empty_cache()
    runner.graphs = None
    want = _step(runner, eager_kv, mask, ids, positions, None)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)

    monkeypatch.setattr(graphs, "_static_step", step)
    runner.graphs = dg = graphs.DecodeGraphs(runner, after=0)
    mask = torch.cat([mask, torch.tensor([True, True, True, False], device="cuda")[:, None]], dim=1)
    got = _step(runner, kv, mask, ids, positions + 1, None)
    assert dg.off is None and (dg.captures, dg.replays) == (1, 1)
    runner.graphs = None
    want = _step(runner, eager_kv, mask, ids, positions + 1, None)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
