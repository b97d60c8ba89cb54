"""Canonical adapter tensors reproduce PeftModel's outputs: causal LM logits, collapsed encoders, SEQ_CLS heads."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from prompt_server.adapters.loader import load_adapter_dir
from prompt_server.adapters.types import ModelSpec
from tests.adapters.reference import reference_classify, reference_logits
from tests.tiny import VARIANTS, make_peft, peft_classify, save_peft, save_raw_checkpoint

TEXT = "The quick brown fox jumps over the lazy dog"


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def base(request, tiny_llama_dir, tiny_gpt2_dir):
    path = tiny_llama_dir if request.param == "llama" else tiny_gpt2_dir
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = AutoTokenizer.from_pretrained(path)(TEXT, return_tensors="pt")["input_ids"]
    return model, ModelSpec.from_config(model.config), ids


def _load(path, spec):
    return load_adapter_dir(path, spec, device="cpu", dtype=torch.float32)


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_saved_adapter_matches_peft_logits(base, variant, fmt, tmp_path):
    model, spec, ids = base
    peft = make_peft(model, variant, num_virtual_tokens=5, seed=3)
    with torch.no_grad():
        expected = peft(input_ids=ids).logits[0, -ids.shape[1]:]  # prompt tuning returns logits for virtual tokens too
        plain = model(input_ids=ids).logits[0]
    record = _load(save_peft(peft, tmp_path / "a", fmt=fmt), spec)
    got = reference_logits(model, record, ids)
    assert (expected - plain).abs().max() > 1e-2  # the adapter matters, so matching it means something
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    assert record.num_virtual_tokens == 5 and record.version == 1
    assert record.extra["weights_file"] == f"adapter_model.{fmt}"


@pytest.mark.parametrize("variant", ["p_tuning_mlp", "p_tuning_lstm", "prefix_projection", "prompt_tuning", "prefix"])
def test_raw_checkpoint_collapses_to_peft_saved_embeddings(base, variant, tmp_path):
    model, spec, ids = base
    peft = make_peft(model, variant, num_virtual_tokens=6, seed=7)
    saved = _load(save_peft(peft, tmp_path / "saved"), spec)
    raw = _load(save_raw_checkpoint(peft, tmp_path / "raw"), spec)
    assert raw.extra["format"] == "raw" and saved.extra["format"] == "peft"
    if saved.prefix is not None:
        torch.testing.assert_close(raw.prefix, saved.prefix, atol=1e-6, rtol=0)
    else:
        torch.testing.assert_close(raw.virtual_tokens, saved.virtual_tokens, atol=1e-6, rtol=0)
    flat = load_file(str(tmp_path / "saved" / "adapter_model.safetensors"))["prompt_embeddings"]
    canonical = saved.prefix if saved.prefix is not None else saved.virtual_tokens
    assert canonical.numel() == flat.numel()
    torch.testing.assert_close(reference_logits(model, raw, ids), reference_logits(model, saved, ids))


def test_prefix_layout_puts_layer_keys_then_values(base, tmp_path):
    model, spec, _ = base
    peft = make_peft(model, "prefix", num_virtual_tokens=3)
    record = _load(save_peft(peft, tmp_path / "a"), spec)
    L, H, d = spec.num_layers, spec.num_kv_heads, spec.head_dim
    flat = peft.get_prompt_embedding_to_save("default")  # [P, L * 2 * H * d]
    assert record.prefix.shape == (L, 2, H, 3, d)
    # PEFT's own split: row chunk j of width H*d is layer j // 2, key if j is even
    for layer in range(L):
        for kv in range(2):
            j = 2 * layer + kv
            chunk = flat[:, j * H * d:(j + 1) * H * d].view(3, H, d).permute(1, 0, 2)  # [H, P, d]
            torch.testing.assert_close(record.prefix[layer, kv], chunk)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_seq_cls_head_matches_peft_classification_logits(variant, kind, tiny_llama_dir, tiny_gpt2_dir, tmp_path):
    path = tiny_llama_dir if kind == "llama" else tiny_gpt2_dir
    peft = make_peft(path, variant, task_type="SEQ_CLS", num_labels=3, seed=5)
    ids = AutoTokenizer.from_pretrained(path)(TEXT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = peft_classify(peft, ids)[0]  # [num_labels]
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    spec = ModelSpec.from_config(model.config)
    record = _load(save_peft(peft, tmp_path / "a"), spec)
    assert record.task_type == "SEQ_CLS" and record.labels == ("LABEL_0", "LABEL_1", "LABEL_2")
    assert record.classifier.weight.shape == (3, spec.hidden_size) and record.classifier.bias is None
    torch.testing.assert_close(reference_classify(model, record, ids), expected, atol=1e-4, rtol=0)
    raw = _load(save_raw_checkpoint(peft, tmp_path / "raw"), spec)
    torch.testing.assert_close(raw.classifier.weight, record.classifier.weight)


def test_dtype_and_device_follow_the_model(base, tmp_path):
    model, spec, _ = base
    peft = make_peft(model, "prefix_projection")
    record = load_adapter_dir(save_peft(peft, tmp_path / "a"), spec, device="cpu", dtype=torch.bfloat16)
    assert record.prefix.dtype == torch.bfloat16 and record.prefix.device.type == "cpu"
    assert record.prefix.is_contiguous()


def test_bert_style_classifier_with_bias(tiny_llama_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    peft = make_peft(tiny_llama_dir, "prompt_tuning", task_type="SEQ_CLS", num_labels=2)
    path = save_peft(peft, tmp_path / "a")
    tensors = load_file(str(path / "adapter_model.safetensors"))
    weight = tensors.pop("base_model.score.weight")
    tensors["base_model.classifier.weight"] = weight
    tensors["base_model.classifier.bias"] = torch.tensor([0.5, -0.5])
    save_file(tensors, str(path / "adapter_model.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    record = _load(path, ModelSpec.from_config(model.config))
    torch.testing.assert_close(record.classifier.weight, weight)
    torch.testing.assert_close(record.classifier.bias, torch.tensor([0.5, -0.5]))
