"""Encoder-only classifiers (BERT, RoBERTa): every soft-prompt kind PEFT supports on them, mixed in one forward,
against PeftModelForSequenceClassification on each input alone."""

from __future__ import annotations

import asyncio
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from prompt_server.adapters.errors import AdapterError
from prompt_server.adapters.registry import AdapterRegistry
from prompt_server.config import Settings
from prompt_server.engine.engine import Engine
from prompt_server.engine.types import ClassifyRequest, GenerateRequest, InvalidRequest
from prompt_server.model.batch import PrefillRow
from prompt_server.model.encoder import EncoderRunner
from prompt_server.model.loader import ModelLoadError, load_model
from tests.engine.conftest import TEST_DEVICE, put_dir
from tests.tiny import VARIANTS, make_peft, save_peft, save_tiny_arch, save_tiny_encoder

TEXTS = ["what a lovely day", "this is terrible and slow, I hated it", "ok"]
FAMILIES = ("bert", "roberta")


@pytest.fixture(scope="module", params=FAMILIES)
def encoder(request, tmp_path_factory):
    """(model dir, loaded model, registry holding one SEQ_CLS adapter of every kind, their PeftModels). The server's
    model on TEST_DEVICE, PEFT's on the CPU."""
    model_dir = save_tiny_encoder(request.param, tmp_path_factory.mktemp(request.param) / "model")
    loaded = load_model(model_dir, device=TEST_DEVICE, dtype="float32", progress=False)
    registry = AdapterRegistry(loaded.spec, device=loaded.device, dtype=loaded.dtype)
    peft = {}
    for i, variant in enumerate(VARIANTS):
        labels = 3 if variant == "p_tuning_lstm" else 2  # a head of its own label count
        pm = make_peft(model_dir, variant, task_type="SEQ_CLS", num_labels=labels, seed=i, num_virtual_tokens=3 + i)
        put_dir(registry, variant, save_peft(pm, tmp_path_factory.mktemp(variant)))
        peft[variant] = pm
    return model_dir, loaded, registry, peft


def peft_probs(pm, tok, text: str) -> torch.Tensor:
    ids = tok(text, return_tensors="pt").input_ids
    with torch.inference_mode():
        return pm(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0].softmax(-1)


def run(loaded, registry, coro_fn, **settings):
    engine = Engine(loaded, registry, Settings(**settings))
    engine.start()
    try:
        return asyncio.run(coro_fn(engine))
    finally:
        engine.stop()


def test_an_encoder_loads_as_a_classifier_and_proves_itself(encoder):
    _, loaded, _, _ = encoder
    assert loaded.spec.family == "encoder" and loaded.plan.forward_path == "encoder"
    assert type(loaded.model).__name__.endswith("ForSequenceClassification")
    out_layer = "weight" if loaded.spec.model_type == "bert" else "out_proj.weight"
    assert dict(loaded.spec.head)[out_layer] == (-1, 64)


def test_every_kind_mixed_in_one_engine_step_matches_peft_alone(encoder):
    _, loaded, registry, peft = encoder
    tok = loaded.tokenizer

    async def go(engine):
        # queued together; the engine batches whatever is waiting when it steps (rows of every kind in one forward
        # are checked directly below, on the runner)
        calls = [engine.classify(ClassifyRequest(inputs=TEXTS, adapter_id=v)) for v in VARIANTS]
        calls.append(engine.classify(ClassifyRequest(inputs=TEXTS)))  # no adapter: the model's own head
        return await asyncio.gather(*calls)

    results = run(loaded, registry, go)
    for variant, preds in zip(VARIANTS, results):
        pm = peft[variant]
        for text, pred in zip(TEXTS, preds):
            expected = peft_probs(pm, tok, text)
            got = torch.tensor(list(pred.scores.values()))
            assert torch.allclose(got, expected, atol=1e-4), (variant, text)
            assert pred.label == f"LABEL_{int(expected.argmax())}"
    base = results[-1]
    for text, pred in zip(TEXTS, base):
        ids = tok(text, return_tensors="pt").input_ids
        with torch.inference_mode():
            expected = loaded.model(input_ids=ids.to(loaded.device)).logits[0].softmax(-1).cpu()
        assert list(pred.scores) == ["negative", "positive"]  # the model's id2label
        assert torch.allclose(torch.tensor(list(pred.scores.values())), expected, atol=1e-4)


def test_rows_of_different_lengths_and_kinds_in_one_forward_equal_each_row_alone(encoder):
    """The layout itself: prefix, virtual-token and plain rows padded together give each row's own scores."""
    _, loaded, registry, _ = encoder
    runner = EncoderRunner(loaded.model)
    tok = loaded.tokenizer
    prefix, virtual = registry.get("prefix"), registry.get("prompt_tuning")
    rows = [PrefillRow(ids=tok(TEXTS[1]).input_ids, prefix=prefix.prefix),
            PrefillRow(ids=tok(TEXTS[2]).input_ids, virtual=virtual.virtual_tokens),
            PrefillRow(ids=tok(TEXTS[0]).input_ids)]
    together = runner.hidden(rows)
    for i, row in enumerate(rows):
        alone = runner.hidden([row])
        torch.testing.assert_close(together[i], alone[0], rtol=0, atol=1e-5)


def test_generation_is_refused_naming_the_family(encoder):
    _, loaded, registry, _ = encoder

    async def go(engine):
        with pytest.raises(InvalidRequest, match=r"is an encoder-only classifier \((bert|roberta)\).*use /classify"):
            engine.submit(GenerateRequest(prompt="hello", max_new_tokens=2))
        return True

    assert run(loaded, registry, go)


def test_a_causal_lm_adapter_is_refused_on_an_encoder_naming_both(encoder, tiny_llama_dir, tmp_path):
    _, loaded, registry, _ = encoder
    files_dir = save_peft(make_peft(tiny_llama_dir, "prompt_tuning"), tmp_path / "causal")
    before = sorted(a.id for a in registry.list())
    with pytest.raises(AdapterError, match=rf"task_type CAUSAL_LM cannot be served on {loaded.spec.model_type} "
                                           r"\(an encoder-only classifier\): expected SEQ_CLS"):
        put_dir(registry, "causal", files_dir)
    assert sorted(a.id for a in registry.list()) == before


def test_a_head_that_is_not_the_models_is_refused_naming_the_parameter(encoder, tmp_path):
    model_dir, loaded, registry, _ = encoder
    saved = save_peft(make_peft(model_dir, "prompt_tuning", task_type="SEQ_CLS"), tmp_path / "a")
    weights = load_file(saved / "adapter_model.safetensors")
    out = "classifier.weight" if loaded.spec.model_type == "bert" else "classifier.out_proj.weight"
    narrow = {**weights, f"base_model.{out}": torch.zeros(2, 32)}
    save_file(narrow, saved / "adapter_model.safetensors")
    label = out.removeprefix("classifier.").replace(".", " ")
    with pytest.raises(AdapterError, match=rf"classifier {label} has shape \[2, 32\], expected \[num_labels, 64\]"):
        put_dir(registry, "narrow", saved)
    missing = {k: v for k, v in weights.items() if not k.endswith("classifier.bias")
               and not k.endswith("out_proj.bias")}
    save_file(missing, saved / "adapter_model.safetensors")
    name = "bias" if loaded.spec.model_type == "bert" else "out_proj.bias"
    with pytest.raises(AdapterError, match=rf"classifier parameter\(s\) {name} missing"):
        put_dir(registry, "missing", saved)
    assert registry.get("narrow") is None and registry.get("missing") is None


def test_a_head_with_fewer_than_two_labels_is_refused(encoder, tmp_path):
    model_dir, loaded, registry, _ = encoder
    saved = save_peft(make_peft(model_dir, "prefix", task_type="SEQ_CLS"), tmp_path / "a")
    weights = load_file(saved / "adapter_model.safetensors")
    out = "classifier" if loaded.spec.model_type == "bert" else "classifier.out_proj"
    label = out.removeprefix("classifier").replace(".", " ").strip()
    for n in (1, 0):
        one = {**weights, f"base_model.{out}.weight": torch.zeros(n, 64), f"base_model.{out}.bias": torch.zeros(n)}
        save_file(one, saved / "adapter_model.safetensors")
        with pytest.raises(AdapterError, match=rf"classifier {label + ' ' if label else ''}weight has {n} outputs: "
                                               r"/classify needs a head of 2 to"):
            put_dir(registry, "one", saved)
    assert registry.get("one") is None


def test_a_checkpoint_without_its_pooler_is_refused(tmp_path):
    """A masked-LM BERT has no pooler: served, it would be random, and no adapter trained on BERT would match."""
    from transformers import AutoModelForMaskedLM

    path = save_tiny_encoder("bert", tmp_path / "cls")
    model = AutoModelForMaskedLM.from_pretrained(path)
    model.save_pretrained(tmp_path / "mlm")
    for f in path.glob("tokenizer*"):
        (tmp_path / "mlm" / f.name).write_bytes(f.read_bytes())
    with pytest.raises(ModelLoadError, match=r"the checkpoint has no weights for bert\.pooler\.dense\.bias, "
                                             r"bert\.pooler\.dense\.weight; they would be served random"):
        load_model(tmp_path / "mlm", device="cpu", progress=False)


def test_a_checkpoint_without_a_head_serves_adapters_only(tmp_path):
    from transformers import AutoModelForMaskedLM

    path = save_tiny_encoder("roberta", tmp_path / "cls")
    AutoModelForMaskedLM.from_pretrained(path).save_pretrained(tmp_path / "mlm")
    for f in path.glob("tokenizer*"):
        (tmp_path / "mlm" / f.name).write_bytes(f.read_bytes())
    loaded = load_model(tmp_path / "mlm", device="cpu", progress=False)
    assert not loaded.head_trained
    registry = AdapterRegistry(loaded.spec, device=loaded.device, dtype=loaded.dtype)
    pm = make_peft(tmp_path / "mlm", "prompt_tuning", task_type="SEQ_CLS", seed=3)
    put_dir(registry, "pt", save_peft(pm, tmp_path / "pt"))

    async def go(engine):
        with pytest.raises(InvalidRequest, match=r"has no trained classifier head, so only SEQ_CLS adapters"):
            await engine.classify(ClassifyRequest(inputs=TEXTS))
        return await engine.classify(ClassifyRequest(inputs=TEXTS, adapter_id="pt"))

    preds = run(loaded, registry, go)
    for text, pred in zip(TEXTS, preds):
        expected = peft_probs(pm, loaded.tokenizer, text)
        assert torch.allclose(torch.tensor(list(pred.scores.values())), expected, atol=1e-4)


def test_a_multi_label_model_scores_each_label_on_its_own(tmp_path):
    path = save_tiny_encoder("bert", tmp_path / "m", problem_type="multi_label_classification")
    loaded = load_model(path, device="cpu", progress=False)
    registry = AdapterRegistry(loaded.spec, device=loaded.device, dtype=loaded.dtype)
    pm = make_peft(path, "p_tuning_mlp", task_type="SEQ_CLS", seed=4)
    put_dir(registry, "tags", save_peft(pm, tmp_path / "a"))

    async def go(engine):
        return await asyncio.gather(engine.classify(ClassifyRequest(inputs=TEXTS, adapter_id="tags")),
                                    engine.classify(ClassifyRequest(inputs=TEXTS)))

    with_adapter, base = run(loaded, registry, go)
    tok = loaded.tokenizer
    for text, pred, own in zip(TEXTS, with_adapter, base):
        ids = tok(text, return_tensors="pt").input_ids
        with torch.inference_mode():
            expected = pm(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0].sigmoid()
            expected_own = loaded.model(input_ids=ids).logits[0].sigmoid()
        assert torch.allclose(torch.tensor(list(pred.scores.values())), expected, atol=1e-4)
        assert torch.allclose(torch.tensor(list(own.scores.values())), expected_own, atol=1e-4)
        assert pred.label == f"LABEL_{int(expected.argmax())}"


def test_an_encoder_decoder_model_without_a_decoder_start_or_of_a_family_not_served_is_refused(tmp_path):
    from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration

    from tests.tiny import build_tokenizer

    path = tmp_path / "t5"
    T5ForConditionalGeneration(T5Config(vocab_size=1000, d_model=32, d_ff=64, num_layers=1, num_heads=2,
                                        d_kv=16)).save_pretrained(path)
    build_tokenizer().save_pretrained(path)
    assert AutoTokenizer.from_pretrained(path) is not None
    # T5Config() sets no decoder_start_token_id; transformers' generate fails on it too
    with pytest.raises(ModelLoadError, match=r"not served: the model has no decoder_start_token_id"):
        load_model(path, device="cpu", progress=False)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "model_type": "pegasus"}))
    with pytest.raises(ModelLoadError, match=r"model_type 'pegasus' .* encoder-decoder model of a family not served "
                                             r"yet: the encoder-decoder models served are t5, mt5, bart"):
        load_model(path, device="cpu", progress=False)


def test_an_encoder_family_not_served_is_refused_not_read_as_a_causal_lm(tmp_path):
    path = save_tiny_arch("llama", tmp_path / "m")  # any weights: the config decides before they are read
    config = path / "config.json"
    import json

    data = json.loads(config.read_text())
    data.update(model_type="xlm-roberta", architectures=["XLMRobertaForMaskedLM"])
    config.write_text(json.dumps(data))
    with pytest.raises(ModelLoadError, match=r"'xlm-roberta' .* encoder-only model of a family not served yet"):
        load_model(path, device="cpu", progress=False)
