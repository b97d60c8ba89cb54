"""The tiny models and every PEFT variant run, and the adapters change the output."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.tiny import VARIANTS, build_tokenizer, make_peft


def test_tokenizer_common_words_are_single_tokens():
    tok = build_tokenizer()
    assert len(tok(" the")["input_ids"]) == 1
    assert len(tok("Once upon a time")["input_ids"]) == 4
    assert tok.bos_token == "<s>" and tok.eos_token == "</s>" and tok.pad_token == "<pad>"
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<s>user\nhi</s>\n<s>assistant\n"
    assert tok.decode(tok("Hello world")["input_ids"]) == "Hello world"


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_peft_variant_runs_and_changes_output(kind, variant, tiny_llama_dir, tiny_gpt2_dir):
    path = tiny_llama_dir if kind == "llama" else tiny_gpt2_dir
    base = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok("The quick brown fox", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        plain = base(input_ids=ids).logits[0, -1]
        peft = make_peft(base, variant)
        tuned = peft(input_ids=ids).logits[0, -1]
    assert torch.isfinite(tuned).all()
    assert (tuned - plain).abs().max() > 1e-2
    assert plain.std() > 1e-3


@pytest.mark.parametrize("variant", VARIANTS)
def test_peft_seq_cls_runs(variant, tiny_llama_dir):
    peft = make_peft(tiny_llama_dir, variant, task_type="SEQ_CLS", num_labels=3)
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    with torch.no_grad():
        logits = peft(**tok("I loved it", return_tensors="pt")).logits
    assert logits.shape == (1, 3) and torch.isfinite(logits).all()
