"""Train the sample adapters in adapters/ on the default model with PEFT, from data scripts/sample_data.py generates,
then check each one's claim on held-out prompts through the server's own engine.

Usage: python scripts/make_sample_adapters.py MODEL_DIR [--out adapters] [--only NAME ...] [--steps N] [--no-check]

Needs peft (the `samples` extra); the server does not. All six took an hour on two CPU cores shared with other work
(about 3 s a step of 8 chat examples on idle cores, so roughly half an hour there); adapters/README.md has the figures.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sample_data as data

BASE_MODEL_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
PIRATE_INSTRUCTION = "You are a pirate. Answer every question like a pirate, with arr and matey."
TRAIN_SEED = 0


# name -> (kind, training examples, optimizer steps, batch size, learning rate)
PLAN = {
    "pirate": ("prompt tuning, initialised from a pirate instruction", 400, 30, 8, 3e-2),
    "french": ("P-tuning, MLP encoder", 400, 80, 8, 3e-3),
    "shout": ("P-tuning, LSTM encoder", 400, 120, 8, 1e-2),
    "terse": ("prefix tuning, no projection", 400, 50, 8, 1e-2),
    "json": ("prefix tuning with a projection", 400, 50, 8, 1e-3),
    "sentiment": ("prompt tuning + classifier head (SEQ_CLS)", 600, 150, 16, 3e-3),
}


def peft_config(name: str, model_dir: str, tokenizer):
    from peft import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, PromptTuningInit

    if name == "pirate":
        n = len(tokenizer(PIRATE_INSTRUCTION)["input_ids"])
        return PromptTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=n, prompt_tuning_init=PromptTuningInit.TEXT,
            prompt_tuning_init_text=PIRATE_INSTRUCTION, tokenizer_name_or_path=model_dir,
        )
    if name in ("french", "shout"):
        return PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=16, encoder_hidden_size=128,
                                   encoder_reparameterization_type="MLP" if name == "french" else "LSTM")
    if name == "terse":
        # zero keys and values start as (almost) no change to the model; random ones swamp every layer at once
        return PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=8, init_weights="zero")
    if name == "json":
        return PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=8, prefix_projection=True,
                                  encoder_hidden_size=128)
    return PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=8)


def examples(name: str, n: int) -> list[tuple[str, str]]:
    """n (user message, assistant answer) training pairs for a generation adapter."""
    if name == "json":
        return [(t, data.json_text(rec)) for t, rec in data.json_examples(False, n, TRAIN_SEED)]
    return data.style_examples(name, False, n, TRAIN_SEED)


def chat_batch(tokenizer, pairs: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
    """Right-padded chat examples as the server builds them (the chat template with its default system prompt); the
    loss covers the assistant's answer and the end-of-turn token only."""
    rows, labels = [], []
    for question, answer in pairs:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                               add_generation_prompt=True)
        p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        a_ids = tokenizer(answer + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
        rows.append(p_ids + a_ids)
        labels.append([-100] * len(p_ids) + a_ids)
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return {
        "input_ids": torch.tensor([r + [pad] * (width - len(r)) for r in rows]),  # [B, S]
        "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows]),
        "labels": torch.tensor([lab + [-100] * (width - len(lab)) for lab in labels]),
    }


def class_batch(tokenizer, pairs: list[tuple[str, str]], labels: list[str]) -> dict[str, torch.Tensor]:
    """Left-padded sentences (the classifier reads the last position, as the server's engine does) and label ids."""
    batch = dict(tokenizer([t for t, _ in pairs], return_tensors="pt", padding=True))
    batch["labels"] = torch.tensor([labels.index(y) for _, y in pairs])
    return batch


def train(model, make_batch, pairs: list, steps: int, batch_size: int, lr: float) -> list[float]:
    """AdamW on the adapter's parameters over shuffled passes through `pairs`, with a short warm-up and a linear
    decay; -> the mean loss of each tenth of the run."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.05, (steps - s) / (steps - warmup))))
    rng = random.Random(TRAIN_SEED)
    order: list[int] = []
    losses: list[float] = []
    model.train()
    for _ in range(steps):
        if len(order) < batch_size:
            order += rng.sample(range(len(pairs)), len(pairs))
        rows, order = order[:batch_size], order[batch_size:]
        loss = model(**make_batch([pairs[i] for i in rows])).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        if len(losses) % 10 == 0:
            print(f"  step {len(losses)}/{steps} loss {sum(losses[-10:]) / 10:.3f}", flush=True)
    tenth = max(1, steps // 10)
    return [sum(losses[i:i + tenth]) / len(losses[i:i + tenth]) for i in range(0, steps, tenth)]


def save(peft_model, out: Path, labels: list[str] | None = None) -> None:
    """PEFT's save_pretrained, then the store's meta.json; the model card and local paths are left out."""
    if out.exists():
        shutil.rmtree(out)
    peft_model.save_pretrained(out)
    (out / "README.md").unlink(missing_ok=True)
    config = json.loads((out / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = BASE_MODEL_NAME
    config["tokenizer_name_or_path"] = BASE_MODEL_NAME if config.get("tokenizer_name_or_path") else None
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    weights = (out / "adapter_model.safetensors").read_bytes()
    meta = {
        "version": 1,
        "created_at": time.time(),
        "labels": labels,
        "sha256": hashlib.sha256(weights).hexdigest(),
        "size_bytes": len(weights) + (out / "adapter_config.json").stat().st_size,
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")


def make(name: str, model_dir: str, out: Path, steps: int | None, lr: float | None = None) -> None:
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    kind, n, default_steps, batch_size, default_lr = PLAN[name]
    steps, lr = steps or default_steps, lr or default_lr
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    torch.manual_seed(TRAIN_SEED)
    start = time.time()
    labels = None
    if name == "sentiment":
        labels = ["negative", "positive"]
        tokenizer.padding_side = "left"
        base = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2, dtype=torch.float32)
        base.config.pad_token_id = tokenizer.pad_token_id
        pairs: list = data.sentiment_examples(False, n, TRAIN_SEED)
        model = get_peft_model(base, peft_config(name, model_dir, tokenizer))
        curve = train(model, lambda b: class_batch(tokenizer, b, labels), pairs, steps, batch_size, lr)
    else:
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        model = get_peft_model(base, peft_config(name, model_dir, tokenizer))
        pairs = examples(name, n)
        curve = train(model, lambda b: chat_batch(tokenizer, b), pairs, steps, batch_size, lr)
    save(model, out / name, labels=labels)
    print(f"{name:10s} {kind:45s} {len(pairs)} examples, {steps} steps x {batch_size}, {time.time() - start:.0f} s; "
          f"loss by tenths: {' '.join(f'{x:.2f}' for x in curve)}", flush=True)


def check(model_dir: str, out: Path, names: list[str]) -> dict[str, float]:
    """Each adapter's held-out claim, through the server's engine (CPU, float32, greedy) on a copy of the store."""
    from fastapi.testclient import TestClient

    from prompt_server.config import Settings
    from prompt_server.main import create_app

    scores = {}
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "adapters"
        shutil.copytree(out, store, ignore=shutil.ignore_patterns(".lock", "README.md", ".gitignore"))
        settings = Settings(model=model_dir, adapters=store, device="cpu", dtype="float32")
        with TestClient(create_app(settings)) as client:
            for name in names:
                score, results = data.held_out_report(client, name)
                scores[name] = score
                print(f"held-out {name:10s} {score:.1%} of {len(results)} keep the claim", flush=True)
                for prompt, answer, ok in results[:3] + [r for r in results[3:] if not r[2]][:5]:
                    print(f"    {'ok ' if ok else 'BAD'} {prompt!r} -> {answer!r}")
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", help="the default model as a Hugging Face directory")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "adapters")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per adapter (default: per adapter)")
    parser.add_argument("--lr", type=float, default=None, help="learning rate (default: per adapter)")
    parser.add_argument("--only", nargs="*", default=[], choices=list(PLAN), help="build only these (default: all)")
    parser.add_argument("--no-check", action="store_true", help="skip the held-out check after training")
    args = parser.parse_args()
    start = time.time()
    names = args.only or list(PLAN)
    args.out.mkdir(parents=True, exist_ok=True)
    for name in names:
        make(name, args.model_dir, args.out, args.steps, args.lr)
    total = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    print(f"wrote {args.out} ({total / 1e6:.2f} MB) in {time.time() - start:.0f} s", flush=True)
    if not args.no_check:
        check(args.model_dir, args.out, names)


if __name__ == "__main__":
    main()
