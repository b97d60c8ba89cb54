"""The sample adapters shipped in adapters/ load into a registry for the default model, one of every kind."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from prompt_server.adapters.registry import AdapterRegistry
from prompt_server.adapters.types import ModelSpec
from tests.adapters.reference import reference_classify

SAMPLES = Path(__file__).resolve().parents[2] / "adapters"
# SmolLM2-135M-Instruct, as documented in DESIGN.md
SMOL = ModelSpec("llama", hidden_size=576, num_layers=30, num_attention_heads=9, num_kv_heads=3, head_dim=64,
                 vocab_size=49152)


def test_samples_load_and_cover_every_kind(tmp_path):
    registry = AdapterRegistry(SMOL, store=SAMPLES)
    assert registry.load_store() == []
    kinds = {(r.peft_type, r.extra.get("encoder_reparameterization_type"), r.extra.get("prefix_projection"),
              r.task_type) for r in registry.list()}
    assert kinds >= {
        ("PROMPT_TUNING", None, None, "CAUSAL_LM"),
        ("P_TUNING", "MLP", None, "CAUSAL_LM"),
        ("P_TUNING", "LSTM", None, "CAUSAL_LM"),
        ("PREFIX_TUNING", None, False, "CAUSAL_LM"),
        ("PREFIX_TUNING", None, True, "CAUSAL_LM"),
        ("PROMPT_TUNING", None, None, "SEQ_CLS"),
    }
    assert registry.get("sentiment").labels == ("negative", "positive")
    total = sum(p.stat().st_size for p in SAMPLES.rglob("*") if p.is_file())
    assert total < 3_000_000


@pytest.mark.slow
def test_sentiment_sample_classifies(default_model_dir):
    model = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    registry = AdapterRegistry(ModelSpec.from_config(model.config), store=SAMPLES)
    assert registry.load_store() == []
    record = registry.get("sentiment")
    for text, label in [("I loved this movie, it was wonderful.", "positive"),
                        ("Terrible service, the waiter was rude.", "negative")]:
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
        logits = reference_classify(model, record, ids)
        assert record.labels[int(logits.argmax())] == label
