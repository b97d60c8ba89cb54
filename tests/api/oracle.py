"""PEFT as the oracle for what the server must generate, and helpers to upload PEFT directories."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoTokenizer

from tests.tiny import make_peft, save_peft


def peft_greedy(peft_model, model_dir: Path, prompt: str, max_new_tokens: int) -> list[int]:
    """The token ids PeftModel.generate picks greedily for `prompt` alone (stopping at EOS, as the server does)."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    enc = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = peft_model.generate(
            input_ids=enc["input_ids"],
            attention_mask=enc["attention_mask"],
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    return out[0, enc["input_ids"].shape[1] :].tolist()


def saved_peft(model_dir: Path, variant: str, out: Path, *, seed: int = 0, fmt: str = "safetensors",
               task_type: str = "CAUSAL_LM") -> tuple[object, Path]:
    """A fresh PeftModel of `variant` over the model in `model_dir`, and the directory PEFT saved it to."""
    peft = make_peft(model_dir, variant, seed=seed, task_type=task_type)
    return peft, save_peft(peft, out, fmt=fmt)


def upload_parts(adapter_dir: Path) -> dict[str, tuple[str, bytes]]:
    """Multipart file parts for a saved PEFT directory."""
    parts = {}
    for name in ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"):
        path = adapter_dir / name
        if path.is_file():
            parts[name] = (name, path.read_bytes())
    return parts
