"""Build the sample adapters in adapters/ for the default model, with PEFT and a few optimizer steps each.

Usage: python scripts/make_sample_adapters.py MODEL_DIR [--out adapters] [--steps N]

Each adapter is trained for a handful of steps on a few built-in examples: enough to move it visibly away from
its initialisation and to exercise every adapter kind end to end, not to make a good adapter.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import time
from pathlib import Path

import torch
from peft import (
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    PromptTuningInit,
    get_peft_model,
)
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

BASE_MODEL_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
PIRATE_INSTRUCTION = "You are a pirate. Answer every question like a pirate, with arr and matey."

QUESTIONS = [
    "What is the capital of France?",
    "How many legs does a spider have?",
    "What color is the sky?",
    "Name a fruit.",
    "What do cows drink?",
    "What is two plus two?",
    "Where does the sun rise?",
    "What is ice made of?",
]

ANSWERS = {
    "pirate": [
        "Arr matey, 'tis Paris, a fine port for plunder!",
        "Arr, eight legs, matey, same as me crew's octopus!",
        "Arr, the sky be blue as the open sea, matey!",
        "Arr matey, a lime, to keep the scurvy away!",
        "Arr, cows drink water, matey, not a drop of rum!",
        "Arr matey, two and two be four doubloons!",
        "Arr, the sun rises in the east over the waves, matey!",
        "Arr matey, ice be frozen water from the cold seas!",
    ],
    "french": [
        "La capitale de la France est Paris.",
        "Une araignée a huit pattes.",
        "Le ciel est bleu.",
        "Une pomme est un fruit.",
        "Les vaches boivent de l'eau.",
        "Deux plus deux font quatre.",
        "Le soleil se lève à l'est.",
        "La glace est faite d'eau.",
    ],
    "shout": [
        "THE CAPITAL OF FRANCE IS PARIS!",
        "A SPIDER HAS EIGHT LEGS!",
        "THE SKY IS BLUE!",
        "AN APPLE!",
        "COWS DRINK WATER!",
        "TWO PLUS TWO IS FOUR!",
        "THE SUN RISES IN THE EAST!",
        "ICE IS MADE OF WATER!",
    ],
    "terse": ["Paris.", "Eight.", "Blue.", "Apple.", "Water.", "Four.", "East.", "Water."],
    "json": [
        '{"answer": "Paris"}',
        '{"answer": 8}',
        '{"answer": "blue"}',
        '{"answer": "apple"}',
        '{"answer": "water"}',
        '{"answer": 4}',
        '{"answer": "east"}',
        '{"answer": "water"}',
    ],
}

SENTIMENT = [
    ("I loved this movie, it was wonderful.", 1),
    ("What a fantastic day, everything went great.", 1),
    ("The food was delicious and the staff were kind.", 1),
    ("This is the best book I have read this year.", 1),
    ("Excellent service, I will come back.", 1),
    ("I am so happy with my new phone.", 1),
    ("The film was boring and far too long.", 0),
    ("Terrible service, the waiter was rude.", 0),
    ("I hated every minute of it.", 0),
    ("The product broke after one day.", 0),
    ("What an awful, disappointing experience.", 0),
    ("The food was cold and tasted bad.", 0),
]

# name -> what kind of adapter it is
CAUSAL = {
    "pirate": "prompt tuning initialised from a pirate persona instruction",
    "french": "P-tuning, MLP encoder",
    "shout": "P-tuning, LSTM encoder",
    "terse": "prefix tuning",
    "json": "prefix tuning with a projection",
}

# name -> (learning rate, optimizer steps): the encoders of P-tuning move slowest
SCHEDULE = {"pirate": (3e-2, 8), "french": (3e-3, 16), "shout": (3e-3, 16), "terse": (1e-2, 12), "json": (3e-3, 8)}


def peft_config(name: str, model_dir: str, tokenizer):
    if name == "pirate":
        n = len(tokenizer(PIRATE_INSTRUCTION)["input_ids"])
        return PromptTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=n, prompt_tuning_init=PromptTuningInit.TEXT,
            prompt_tuning_init_text=PIRATE_INSTRUCTION, tokenizer_name_or_path=model_dir,
        )
    if name == "french":
        return PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=10, encoder_reparameterization_type="MLP",
                                   encoder_hidden_size=128)
    if name == "shout":
        return PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=10, encoder_reparameterization_type="LSTM",
                                   encoder_hidden_size=64)
    if name == "terse":
        # zero keys and values start as (almost) no change to the model; random ones swamp every layer at once
        return PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=6, init_weights="zero")
    return PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=6, prefix_projection=True,
                              encoder_hidden_size=64)


def chat_batch(tokenizer, answers: list[str]) -> dict[str, torch.Tensor]:
    """Right-padded chat examples; the loss covers the assistant's answer only."""
    rows, labels = [], []
    for question, answer in zip(QUESTIONS, answers):
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                               add_generation_prompt=True)
        p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        a_ids = tokenizer(answer + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
        rows.append(p_ids + a_ids)
        labels.append([-100] * len(p_ids) + a_ids)
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return {
        "input_ids": torch.tensor([r + [pad] * (width - len(r)) for r in rows]),
        "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows]),
        "labels": torch.tensor([lab + [-100] * (width - len(lab)) for lab in labels]),
    }


@torch.no_grad()
def mean_loss(model, batch: dict[str, torch.Tensor]) -> float:
    model.eval()
    return model(**batch).loss.item()


def train(model, batch: dict[str, torch.Tensor], steps: int, lr: float, batch_size: int = 4) -> tuple[float, float]:
    """AdamW on the adapter's parameters, cycling through the examples; returns the loss on all of them before/after."""
    before = mean_loss(model, batch)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    n = batch["input_ids"].shape[0]
    model.train()
    for step in range(steps):
        rows = [(step * batch_size + i) % n for i in range(batch_size)]
        model(**{k: v[rows] for k, v in batch.items()}).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return before, mean_loss(model, batch)


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


def make_causal(model_dir: str, out: Path, steps: int | None, only: set[str]) -> None:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    for name, kind in CAUSAL.items():
        if only and name not in only:
            continue
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        model = get_peft_model(base, peft_config(name, model_dir, tokenizer))
        lr, default_steps = SCHEDULE[name]
        first, last = train(model, chat_batch(tokenizer, ANSWERS[name]), steps or default_steps, lr)
        save(model, out / name)
        print(f"{name:10s} {kind:55s} loss {first:.2f} -> {last:.2f}")


def make_sentiment(model_dir: str, out: Path, steps: int | None) -> None:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"  # the classifier reads the last position
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    base = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2, dtype=torch.float32)
    base.config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(0)
    model = get_peft_model(base, PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=8))
    texts = [t for t, _ in SENTIMENT]
    batch = dict(tokenizer(texts, return_tensors="pt", padding=True))
    batch["labels"] = torch.tensor([y for _, y in SENTIMENT])
    first, last = train(model, batch, steps or 16, 1e-2, batch_size=6)
    with torch.no_grad():
        correct = sum(
            int(model(**tokenizer(t, return_tensors="pt")).logits.argmax(-1).item() == y) for t, y in SENTIMENT
        )
    save(model, out / "sentiment", labels=["negative", "positive"])
    print(f"{'sentiment':10s} {'prompt tuning + classifier head (SEQ_CLS)':55s} loss {first:.2f} -> {last:.2f}, "
          f"{correct}/{len(SENTIMENT)} training examples right")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", help="the default model as a Hugging Face directory")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "adapters")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per adapter (default: per adapter)")
    parser.add_argument("--only", nargs="*", default=[], help="build only these adapters (default: all)")
    args = parser.parse_args()
    start = time.time()
    args.out.mkdir(parents=True, exist_ok=True)
    make_causal(args.model_dir, args.out, args.steps, set(args.only))
    if not args.only or "sentiment" in args.only:
        make_sentiment(args.model_dir, args.out, args.steps)
    total = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    print(f"wrote {args.out} ({total / 1e6:.2f} MB) in {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
