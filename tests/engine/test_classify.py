"""Classification through the engine: SEQ_CLS heads and verbalizer labels, checked against PEFT."""

from __future__ import annotations

import asyncio

import pytest
import torch

from prompt_server.engine.types import ClassifyRequest, GenerateRequest, InvalidRequest
from tests.engine.conftest import put_dir, run_engine
from tests.tiny import make_peft, peft_classify, save_peft

TEXTS = ["what a lovely day", "this is terrible and slow", "ok"]


@pytest.mark.parametrize("variant", ["prompt_tuning", "p_tuning_mlp", "prefix"])
def test_classifier_head_matches_peft_seq_cls(llama_world, tiny_llama_dir, tmp_path, variant):
    world = llama_world
    pm = make_peft(tiny_llama_dir, variant, task_type="SEQ_CLS", num_labels=3, seed=7)
    put_dir(world.registry, f"cls-{variant}", save_peft(pm, tmp_path / "cls"), labels=["neg", "neu", "pos"])

    async def go(engine):
        # a generation in flight at the same time shares the engine with the classification
        other = engine.submit(GenerateRequest(prompt="hello world", adapter_id="prefix", max_new_tokens=6))
        preds = await engine.classify(ClassifyRequest(inputs=TEXTS, adapter_id=f"cls-{variant}"))
        await other.result()
        return preds

    preds = run_engine(world, go)
    tok = world.loaded.tokenizer
    for text, pred in zip(TEXTS, preds):
        ids = tok(text, return_tensors="pt").input_ids
        with torch.inference_mode():
            probs = peft_classify(pm, ids)[0].softmax(-1)
        got = torch.tensor([pred.scores[k] for k in ("neg", "neu", "pos")])
        assert torch.allclose(got, probs, atol=1e-4)
        assert pred.label == ["neg", "neu", "pos"][int(probs.argmax())]
        assert pred.score == pytest.approx(float(probs.max()), abs=1e-4)


def test_verbalizer_labels_score_continuations_like_peft(llama_world):
    world = llama_world
    tok = world.loaded.tokenizer
    labels = ["good", "bad news"]
    preds = run_engine(world, lambda e: e.classify(ClassifyRequest(inputs=TEXTS[:2], adapter_id="p_tuning_lstm",
                                                                   labels=labels)))
    pm = world.peft["p_tuning_lstm"]
    for text, pred in zip(TEXTS[:2], preds):
        totals = []
        for label in labels:
            prompt = tok(text).input_ids
            cont = tok(" " + label, add_special_tokens=False).input_ids
            ids = torch.tensor([prompt + cont], device=world.loaded.device)
            with torch.inference_mode():
                logp = pm(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0].log_softmax(-1)
            # PEFT returns logits for virtual + real positions; the real ones are the last len(ids)
            logp = logp[-ids.shape[1]:]
            totals.append(sum(logp[len(prompt) - 1 + k, t].item() for k, t in enumerate(cont)))
        expected = torch.tensor(totals).softmax(-1)
        got = torch.tensor([pred.scores[label] for label in labels])
        assert torch.allclose(got, expected, atol=1e-4)


def test_classify_errors_name_the_problem(llama_world):
    async def go(engine):
        errors = []
        for req in (ClassifyRequest(inputs=["x"], labels=["only"]),
                    ClassifyRequest(inputs=["x"], labels=["a", "a"]),
                    ClassifyRequest(inputs=[], labels=["a", "b"])):
            with pytest.raises(InvalidRequest) as err:
                await engine.classify(req)
            errors.append(str(err.value))
        return errors

    errors = run_engine(llama_world, go)
    assert errors == [
        "labels: at least 2 labels are needed to score as continuations, got 1",
        "labels: labels must be distinct",
        "inputs: at least one input is needed",
    ]


def test_seq_cls_adapter_refuses_generation_and_head_label_count_is_checked(llama_world, tiny_llama_dir, tmp_path):
    world = llama_world
    pm = make_peft(tiny_llama_dir, "prompt_tuning", task_type="SEQ_CLS", num_labels=2, seed=3)
    put_dir(world.registry, "cls2", save_peft(pm, tmp_path / "cls2"))

    async def go(engine):
        with pytest.raises(InvalidRequest, match="'cls2' is a SEQ_CLS adapter; use /classify"):
            engine.submit(GenerateRequest(prompt="hi", adapter_id="cls2"))
        with pytest.raises(InvalidRequest, match="classifier head has 2 outputs, got 3 labels"):
            await engine.classify(ClassifyRequest(inputs=["hi"], adapter_id="cls2", labels=["a", "b", "c"]))
        preds = await engine.classify(ClassifyRequest(inputs=["hi"], adapter_id="cls2"))
        return preds

    preds = run_engine(world, go)
    assert set(preds[0].scores) == {"LABEL_0", "LABEL_1"}
    assert sum(preds[0].scores.values()) == pytest.approx(1.0)


def test_many_classifications_and_generations_interleave(llama_world):
    async def go(engine):
        gens = [engine.submit(GenerateRequest(prompt=t, adapter_id="prefix", max_new_tokens=5)) for t in TEXTS]
        cls = [engine.classify(ClassifyRequest(inputs=[t], labels=["yes", "no"])) for t in TEXTS]
        results = await asyncio.gather(*cls, *(g.result() for g in gens))
        return results

    results = run_engine(llama_world, go)
    assert all(len(r) == 1 for r in results[:3])
    assert all(len(r.tokens) >= 1 for r in results[3:])


def test_classify_limits_labels_and_context(llama_world):
    async def go(engine):
        errors = []
        with pytest.raises(InvalidRequest) as err:
            await engine.classify(ClassifyRequest(inputs=["x"], labels=[f"l{i}" for i in range(40)]))
        errors.append(str(err.value))
        with pytest.raises(InvalidRequest) as err:
            await engine.classify(ClassifyRequest(inputs=["word " * 600], labels=["a", "b"]))
        errors.append(str(err.value))
        return errors

    errors = run_engine(llama_world, go, max_input_tokens=4096)
    assert errors[0] == "labels: at most 32 labels, got 40"
    assert errors[1].startswith("inputs[0]: 0 virtual + ") and errors[1].endswith("exceed the model's context of 512")
