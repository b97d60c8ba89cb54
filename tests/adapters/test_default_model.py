"""On the real default model (GQA: 30 layers, 9 heads, 3 kv heads), every variant matches PeftModel in float32."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from prompt_server.adapters.loader import load_adapter_dir
from prompt_server.adapters.types import ModelSpec
from tests.adapters.reference import reference_logits
from tests.tiny import VARIANTS, make_peft, save_peft, save_raw_checkpoint

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol(default_model_dir):
    model = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    ids = tokenizer("Write one sentence about the sea.", return_tensors="pt")["input_ids"]
    return model, ModelSpec.from_config(model.config), ids


@pytest.mark.parametrize("variant", VARIANTS)
def test_default_model_matches_peft(smol, variant, tmp_path):
    model, spec, ids = smol
    assert (spec.num_layers, spec.num_kv_heads, spec.head_dim) == (30, 3, 64)
    peft = make_peft(model, variant, num_virtual_tokens=8, seed=11)
    with torch.no_grad():
        expected = peft(input_ids=ids).logits[0, -ids.shape[1]:]
    record = load_adapter_dir(save_peft(peft, tmp_path / "a"), spec, device="cpu", dtype=torch.float32)
    torch.testing.assert_close(reference_logits(model, record, ids), expected, atol=1e-4, rtol=0)
    if variant != "prompt_tuning":
        raw = load_adapter_dir(save_raw_checkpoint(peft, tmp_path / "raw"), spec, device="cpu", dtype=torch.float32)
        collapsed = raw.prefix if raw.is_prefix else raw.virtual_tokens
        saved = record.prefix if record.is_prefix else record.virtual_tokens
        torch.testing.assert_close(collapsed, saved, atol=1e-6, rtol=0)
