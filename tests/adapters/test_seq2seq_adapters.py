"""SEQ_2_SEQ_LM adapters on encoder-decoder models (T5, BART) at the registry: what is accepted, what is stored,
and what is refused with the reason."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from prompt_server.adapters.errors import AdapterError
from prompt_server.adapters.registry import AdapterRegistry
from prompt_server.model.loader import load_model
from tests.adapters.conftest import dir_files
from tests.tiny import SEQ2SEQ_ARCHITECTURES, VARIANTS, make_peft, save_peft, save_tiny_seq2seq

PROMPT_VARIANTS = tuple(v for v in VARIANTS if not v.startswith("prefix"))
PREFIX_VARIANTS = tuple(v for v in VARIANTS if v.startswith("prefix"))


@pytest.fixture(scope="module", params=SEQ2SEQ_ARCHITECTURES)
def seq2seq_dir(request, tmp_path_factory):
    """A tiny T5 / BART directory."""
    return save_tiny_seq2seq(request.param, tmp_path_factory.mktemp(request.param) / "model")


@pytest.fixture(scope="module")
def seq2seq(seq2seq_dir):
    """(model dir, the spec the server loads it with)."""
    return seq2seq_dir, load_model(seq2seq_dir, device="cpu", dtype="float32", progress=False).spec


@pytest.fixture
def registry(seq2seq):
    return AdapterRegistry(seq2seq[1], device="cpu", dtype=torch.float32)


def saved(model_dir, tmp_path, variant, name=None, **kw):
    """A PEFT-saved SEQ_2_SEQ_LM adapter of `variant` on the model: (its directory, the saved prompt table)."""
    kw.setdefault("task_type", "SEQ_2_SEQ_LM")
    path = save_peft(make_peft(model_dir, variant, **kw), tmp_path / (name or variant))
    return path, load_file(path / "adapter_model.safetensors")["prompt_embeddings"]


@pytest.mark.parametrize("submodules", [None, 1])
@pytest.mark.parametrize("variant", PROMPT_VARIANTS)
def test_prompt_and_p_tuning_adapters_keep_the_first_virtual_tokens_rows(seq2seq, registry, tmp_path, variant,
                                                                          submodules):
    """PEFT's table has num_virtual_tokens rows per transformer submodule (2 by default on SEQ_2_SEQ_LM); the
    encoder input gets the first num_virtual_tokens of them, and only those are stored."""
    model_dir, spec = seq2seq
    path, table = saved(model_dir, tmp_path, variant, num_virtual_tokens=5, seed=3,
                        num_transformer_submodules=submodules)
    assert json.loads((path / "adapter_config.json").read_text())["num_transformer_submodules"] == (submodules or 2)
    assert table.shape == ((submodules or 2) * 5, spec.hidden_size)
    record, created = registry.put("a", dir_files(path))
    assert created and registry.get("a") is record
    assert record.task_type == "SEQ_2_SEQ_LM" and record.num_virtual_tokens == 5
    assert record.peft_type == ("PROMPT_TUNING" if variant == "prompt_tuning" else "P_TUNING")
    assert not record.is_prefix and record.classifier is None
    assert record.virtual_tokens.shape == (5, spec.hidden_size)
    torch.testing.assert_close(record.virtual_tokens, table[:5], rtol=0, atol=0)


@pytest.mark.parametrize("variant", PREFIX_VARIANTS)
def test_prefix_adapters_are_accepted(seq2seq, registry, tmp_path, variant):
    model_dir, _ = seq2seq
    path, table = saved(model_dir, tmp_path, variant, num_virtual_tokens=6, seed=4)
    assert table.shape == (6, 2 * 2 * 64)  # [P, num_layers * 2 * token_dim], whatever the submodule count
    record, created = registry.put("p", dir_files(path))
    assert created and record.is_prefix and record.virtual_tokens is None
    assert record.peft_type == "PREFIX_TUNING" and record.task_type == "SEQ_2_SEQ_LM"
    assert record.num_virtual_tokens == 6
    assert record.prefix.shape[1:] == (2, 4, 6, 16)  # [layers, keys/values, kv heads, P, head_dim]
    assert torch.isfinite(record.prefix).all()


@pytest.mark.parametrize("variant", PREFIX_VARIANTS)
def test_prefix_with_one_transformer_submodule_is_refused(seq2seq, registry, tmp_path, variant):
    """PEFT hands such a prefix to the model as one plain cache, which the decoder's self- and cross-attention then
    both append to: its generate fails on a batch of two and is wrong on a batch of one."""
    model_dir, _ = seq2seq
    path, _ = saved(model_dir, tmp_path, variant, num_transformer_submodules=1)
    with pytest.raises(AdapterError, match=r"num_transformer_submodules"):
        registry.put("p1", dir_files(path))
    assert registry.get("p1") is None and len(registry) == 0


def test_a_causal_lm_adapter_is_refused_naming_its_task_type(registry, tiny_llama_dir, tmp_path):
    """A CAUSAL_LM adapter of a causal model of the same width (tests.conftest: save_tiny_model("llama")) would
    pass every tensor check: the task type refuses it."""
    path = save_peft(make_peft(tiny_llama_dir, "prompt_tuning", seed=1), tmp_path / "causal")
    with pytest.raises(AdapterError, match=r"task_type CAUSAL_LM"):
        registry.put("causal", dir_files(path))
    assert registry.get("causal") is None


@pytest.mark.parametrize("submodules", [None, 1])
def test_a_seq2seq_adapter_is_refused_on_a_causal_model(seq2seq_dir, llama_spec, tmp_path, submodules):
    """With one submodule the tensors fit a causal model of the same width too: the task type refuses it."""
    model_dir = seq2seq_dir
    path, table = saved(model_dir, tmp_path, "prompt_tuning", num_transformer_submodules=submodules)
    assert table.shape[1] == llama_spec.hidden_size
    causal = AdapterRegistry(llama_spec, device="cpu", dtype=torch.float32)
    with pytest.raises(AdapterError, match=r"task_type SEQ_2_SEQ_LM"):
        causal.put("s2s", dir_files(path))
    assert causal.get("s2s") is None


def test_a_prefix_whose_num_layers_does_not_match_is_refused(seq2seq, registry, tmp_path):
    """Made by PEFT for a three-layer model: config and table agree with each other, not with this model."""
    from peft import PrefixTuningConfig, get_peft_model
    from transformers import AutoModelForSeq2SeqLM

    model_dir, _ = seq2seq
    config = PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=4, num_layers=3)
    path = save_peft(get_peft_model(AutoModelForSeq2SeqLM.from_pretrained(model_dir), config), tmp_path / "deep")
    assert load_file(path / "adapter_model.safetensors")["prompt_embeddings"].shape == (4, 3 * 2 * 64)
    with pytest.raises(AdapterError, match=r"num_layers 3"):
        registry.put("deep", dir_files(path))
    assert registry.get("deep") is None


@pytest.mark.parametrize("variant", VARIANTS)
def test_seq_cls_adapters_are_refused_naming_seq_cls(seq2seq, registry, tmp_path, variant):
    """PeftModelForSequenceClassification over T5ForSequenceClassification / BartForSequenceClassification fails
    in PEFT for every kind (input embeddings are not accepted; a prefix finds no classifier layer), and PEFT saves
    no head for them: there is nothing to serve."""
    model_dir, _ = seq2seq
    path, _ = saved(model_dir, tmp_path, variant, task_type="SEQ_CLS", seed=2)
    assert sorted(load_file(path / "adapter_model.safetensors")) == ["prompt_embeddings"]
    with pytest.raises(AdapterError, match=r"SEQ_CLS"):
        registry.put("cls", dir_files(path))
    assert registry.get("cls") is None
