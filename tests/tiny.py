"""Tiny offline models, a tokenizer and PEFT soft-prompt adapters for tests (no downloads)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

VARIANTS = ("prompt_tuning", "p_tuning_mlp", "p_tuning_lstm", "prefix", "prefix_projection")

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
CHAT_TEMPLATE = (
    "{% for message in messages %}<s>{{ message['role'] }}\n{{ message['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)

_CORPUS = """
The quick brown fox jumps over the lazy dog. Hello world! How are you today? I am fine, thank you.
Once upon a time there was a little cat who lived in a small house by the river.
The weather is good and the sun is shining. It was a great day, and the movie was wonderful.
This film was terrible and boring. I loved it. I hated it. The food was bad. The service was excellent.
Question: what is the capital of France? Answer: Paris. Translate to French: cheese, bread, wine.
You are a helpful assistant. Please answer the question in one short sentence.
positive negative neutral yes no true false good bad happy sad one two three four five six seven eight nine ten
system user assistant message content the a an of to in is it and or not for with on at by from as be this that
"""


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on a built-in text, so common words are single tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1000,
        min_frequency=1,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 20, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD)
    fast.chat_template = CHAT_TEMPLATE
    return fast


# Tiny configs of the decoder-only architectures the server is tested on: 2 layers, hidden 64, 4 heads (2 KV heads
# where the family has grouped-query attention), and the path the server is expected to choose for each.
ARCHITECTURES: dict[str, tuple[str, dict]] = {
    "llama": ("lean", {"num_key_value_heads": 2, "intermediate_size": 128}),
    "mistral": ("lean", {"num_key_value_heads": 2, "intermediate_size": 128, "sliding_window": 128}),
    "qwen2": ("lean", {"num_key_value_heads": 2, "intermediate_size": 128}),  # q/k/v biases
    "gemma": ("generic", {"num_key_value_heads": 2, "intermediate_size": 128, "head_dim": 16}),
    "phi3": ("generic", {"num_key_value_heads": 2, "intermediate_size": 128}),
    "gpt2": ("generic", {}),
    "gpt_neox": ("generic", {"intermediate_size": 128, "rotary_pct": 0.5}),
    "opt": ("generic", {"ffn_dim": 128, "word_embed_proj_dim": 64}),
    "bloom": ("generic", {}),
}


def save_tiny_arch(model_type: str, path: str | Path, **overrides) -> Path:
    """A tiny random model of `model_type` (a key of ARCHITECTURES) plus tokenizer, saved by transformers 5."""
    from transformers import AutoConfig

    path = Path(path)
    tokenizer = build_tokenizer()
    common = {"vocab_size": len(tokenizer), "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "max_position_embeddings": 512, "initializer_range": 0.1, "tie_word_embeddings": False,
              "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
              "pad_token_id": tokenizer.pad_token_id}
    if model_type == "gpt2":
        common["n_positions"] = common.pop("max_position_embeddings")
    if model_type == "opt":
        common["tie_word_embeddings"] = True  # OPT's own default; its lm_head is the embedding
    config = AutoConfig.for_model(model_type, **{**common, **ARCHITECTURES[model_type][1], **overrides})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def resave_as_transformers_4(src: str | Path, dst: str | Path, tokenizer: str = "fast") -> Path:
    """Copy a model directory written by transformers 5 into the files transformers 4.x wrote for it.

    config.json: top-level rope_theta (and rope_scaling) instead of rope_parameters, torch_dtype instead of dtype.
    tokenizer "fast": tokenizer.json with tokenizer_class PreTrainedTokenizerFast; "gpt2": the slow GPT2Tokenizer's
    vocab.json + merges.txt, no tokenizer.json.
    """
    import shutil

    src, dst = Path(src), Path(dst)
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    rope = dict(config.pop("rope_parameters", None) or {})
    if rope:
        config["rope_theta"] = rope.pop("rope_theta")
        if rope.get("rope_type", "default") != "default":
            config["rope_scaling"] = rope
    config["torch_dtype"] = config.pop("dtype", "float32")
    config["transformers_version"] = "4.57.1"
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    tok_config = json.loads((dst / "tokenizer_config.json").read_text())
    tok_config.pop("backend", None)
    if tokenizer == "fast":
        tok_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    elif tokenizer == "gpt2":
        backend = Tokenizer.from_file(str(dst / "tokenizer.json"))
        backend.model.save(str(dst))  # vocab.json, merges.txt
        (dst / "tokenizer.json").unlink()
        tok_config.update(tokenizer_class="GPT2Tokenizer", add_prefix_space=False, add_bos_token=False)
    else:
        raise ValueError(f"tokenizer must be 'fast' or 'gpt2', got {tokenizer!r}")
    (dst / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))
    return dst


def save_tiny_encoder(model_type: str, path: str | Path, **overrides) -> Path:
    """A tiny random encoder classifier ("bert", "roberta") with a 2-label head, plus tokenizer; fixed seed."""
    from transformers import AutoConfig

    path = Path(path)
    tokenizer = build_tokenizer()
    fields = {"vocab_size": len(tokenizer), "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "intermediate_size": 128, "max_position_embeddings": 128, "pad_token_id": tokenizer.pad_token_id,
              "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
              "id2label": {0: "negative", 1: "positive"}, "label2id": {"negative": 0, "positive": 1}}
    config = AutoConfig.for_model(model_type, **{**fields, **overrides})
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config).eval()
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


# Tiny encoder-decoder ("seq2seq") models: d_model 64, 2 encoder and 2 decoder layers, 4 heads, ffn 128. Under the
# default init (T5 initializer_factor 1.0, BART init_std 0.02) every greedy token is the same one (T5: pad, BART: eos
# at once). T5's layers get initializer_factor 2.0 and its (tied) token embeddings std 0.5, redrawn: with the
# factor's std 2.0 the residual stream is mostly the input token's embedding, which the tied head echoes back, and a
# factor large enough to break the echo (5) drives logits to ~100, where transformers' own incremental and full
# forwards differ by 2e-3 in logprob. As set, greedy outputs differ between prompts and logits stay below ~10.
SEQ2SEQ_ARCHITECTURES = ("t5", "mt5", "bart")
T5_INIT_FACTOR = 2.0
T5_EMBEDDING_STD = 0.5
BART_INIT_STD = 0.2


def save_tiny_seq2seq(model_type: str, path: str | Path, **overrides) -> Path:
    """A tiny random encoder-decoder LM ("t5", "mt5" or "bart") plus tokenizer, saved by transformers 5; fixed seed.

    T5 starts decoding at pad, as T5 does; mT5 is T5 with a gated-GELU feed-forward and an untied output head; BART at eos, with eos forced at the last allowed step
    (forced_eos_token_id) and its embeddings scaled by sqrt(d_model) (scale_embedding).
    """
    from transformers import BartConfig, MT5Config, T5Config

    path = Path(path)
    tokenizer = build_tokenizer()
    ids = {"pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id}
    if model_type in ("t5", "mt5"):
        fields = {"vocab_size": len(tokenizer), "d_model": 64, "d_kv": 16, "num_heads": 4, "d_ff": 128,
                  "num_layers": 2, "num_decoder_layers": 2, "relative_attention_num_buckets": 8,
                  "initializer_factor": T5_INIT_FACTOR, "decoder_start_token_id": tokenizer.pad_token_id, **ids}
        if model_type == "mt5":
            fields.update(feed_forward_proj="gated-gelu", tie_word_embeddings=False)
        config = (T5Config if model_type == "t5" else MT5Config)(**{**fields, **overrides})
    elif model_type == "bart":
        fields = {"vocab_size": len(tokenizer), "d_model": 64, "encoder_layers": 2, "decoder_layers": 2,
                  "encoder_attention_heads": 4, "decoder_attention_heads": 4, "encoder_ffn_dim": 128,
                  "decoder_ffn_dim": 128, "max_position_embeddings": 128, "init_std": BART_INIT_STD,
                  "scale_embedding": True, "bos_token_id": tokenizer.bos_token_id,
                  "decoder_start_token_id": tokenizer.eos_token_id, "forced_eos_token_id": tokenizer.eos_token_id,
                  **ids}
        config = BartConfig(**{**fields, **overrides})
    else:
        raise ValueError(f"model_type must be one of {SEQ2SEQ_ARCHITECTURES}, got {model_type!r}")
    torch.manual_seed(0)
    model = AutoModelForSeq2SeqLM.from_config(config).eval()
    if model_type in ("t5", "mt5") and "initializer_factor" not in overrides:  # an explicit factor keeps T5's own init
        with torch.no_grad():
            model.get_input_embeddings().weight.normal_(0.0, T5_EMBEDDING_STD)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def save_tiny_model(kind: str, path: str | Path) -> Path:
    """Write a tiny random model ("llama" with GQA, or "gpt2") plus tokenizer to `path`; fixed seed."""
    path = Path(path)
    tokenizer = build_tokenizer()
    vocab = len(tokenizer)
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    torch.manual_seed(0)
    model: PreTrainedModel
    if kind == "llama":
        config = LlamaConfig(
            vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.1, tie_word_embeddings=False,
            **ids,
        )
        model = LlamaForCausalLM(config)
    elif kind == "gpt2":
        config = GPT2Config(vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=512,
                            initializer_range=0.1, **ids)
        model = GPT2LMHeadModel(config)
    else:
        raise ValueError(f"kind must be 'llama' or 'gpt2', got {kind!r}")
    model.eval()
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def _peft_config(variant: str, task_type: str, num_virtual_tokens: int, num_transformer_submodules: int | None = None):
    from peft import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig

    common = {"task_type": task_type, "num_virtual_tokens": num_virtual_tokens}
    if num_transformer_submodules is not None:  # else PEFT's default: 2 for SEQ_2_SEQ_LM, 1 otherwise
        common["num_transformer_submodules"] = num_transformer_submodules
    if variant == "prompt_tuning":
        return PromptTuningConfig(**common)
    if variant in ("p_tuning_mlp", "p_tuning_lstm"):
        kind = "MLP" if variant == "p_tuning_mlp" else "LSTM"
        return PromptEncoderConfig(encoder_reparameterization_type=kind, encoder_hidden_size=32, **common)
    if variant in ("prefix", "prefix_projection"):
        return PrefixTuningConfig(prefix_projection=variant == "prefix_projection", encoder_hidden_size=32, **common)
    raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")


def _randomize(module: torch.nn.Module, gen: torch.Generator, embedding_std: float = 0.5) -> None:
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("embedding.weight"):
                std = embedding_std
            elif p.dim() >= 2:
                std = p.shape[-1] ** -0.5
            else:
                std = 0.1
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype) * std)


def make_peft(base_model, variant: str, *, task_type: str = "CAUSAL_LM", num_virtual_tokens: int = 4,
              seed: int = 0, num_labels: int = 2, num_transformer_submodules: int | None = None):
    """A PeftModel of `variant` over `base_model` (a model or a directory), encoder weights randomized, eval mode.

    task_type "SEQ_2_SEQ_LM" loads a directory with AutoModelForSeq2SeqLM; `num_transformer_submodules`, when
    given, goes into the PEFT config (PEFT's default is 2 for SEQ_2_SEQ_LM, 1 for the other task types).
    """
    from peft import get_peft_model

    if isinstance(base_model, (str, Path)):
        if task_type == "SEQ_CLS":  # a head of another label count than the saved one is trained from scratch
            base_model = AutoModelForSequenceClassification.from_pretrained(base_model, num_labels=num_labels,
                                                                            ignore_mismatched_sizes=True)
        elif task_type == "SEQ_2_SEQ_LM":
            base_model = AutoModelForSeq2SeqLM.from_pretrained(base_model)
        else:
            base_model = AutoModelForCausalLM.from_pretrained(base_model)
    elif task_type == "SEQ_CLS":
        base_model = AutoModelForSequenceClassification.from_pretrained(
            base_model.name_or_path, num_labels=num_labels, dtype=base_model.dtype)
    if task_type == "SEQ_CLS" and base_model.config.pad_token_id is None:
        base_model.config.pad_token_id = base_model.config.eos_token_id
    config = _peft_config(variant, task_type, num_virtual_tokens, num_transformer_submodules)
    peft_model = get_peft_model(base_model, config)
    gen = torch.Generator().manual_seed(seed)
    _randomize(peft_model.prompt_encoder["default"], gen)
    if task_type == "SEQ_CLS":
        for name, p in peft_model.named_parameters():
            if "modules_to_save" in name:
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape, generator=gen).to(p.dtype) * 0.5)
    peft_model.eval()
    return peft_model


def save_peft(peft_model, dir: str | Path, *, fmt: str = "safetensors") -> Path:
    """PEFT's own save_pretrained, as safetensors or as a pickled .bin."""
    if fmt not in ("safetensors", "bin"):
        raise ValueError(f"fmt must be 'safetensors' or 'bin', got {fmt!r}")
    dir = Path(dir)
    peft_model.save_pretrained(dir, safe_serialization=fmt == "safetensors")
    return dir


def raw_state_dict(peft_model) -> dict[str, torch.Tensor]:
    """The encoders' own weights as PeftModel.state_dict() names them, plus any SEQ_CLS head PEFT would save."""
    from peft import get_peft_model_state_dict

    sd = {k: v.detach().clone().contiguous() for k, v in peft_model.state_dict().items()
          if k.startswith("prompt_encoder.")}
    for k, v in get_peft_model_state_dict(peft_model).items():
        if k != "prompt_embeddings":
            sd[k] = v.detach().clone().contiguous()
    return sd


def save_raw_checkpoint(peft_model, dir: str | Path) -> Path:
    """adapter_config.json + the encoders' own weights (a training checkpoint, not yet collapsed)."""
    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    config = peft_model.peft_config["default"].to_dict()
    config = {k: (v.value if hasattr(v, "value") else v) for k, v in config.items()}
    config["inference_mode"] = False
    config["target_modules"] = list(config["target_modules"]) if config.get("target_modules") else None
    config["modules_to_save"] = list(config["modules_to_save"]) if config.get("modules_to_save") else None
    (dir / "adapter_config.json").write_text(json.dumps(config, indent=2, default=str))
    save_file(raw_state_dict(peft_model), str(dir / "adapter_model.safetensors"))
    return dir


def peft_classify(peft_model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """PeftModelForSequenceClassification's logits for `input_ids` [1, T] -> [1, num_labels].

    PEFT 0.21 decides how to hand a prefix to the backbone by looking for a `past_key_values` parameter, which
    transformers 5.24 renamed `cache` (the old name still works through **kwargs). Where that check fails we take
    the branch PEFT takes when it finds the name: the prefix as past key values, the mask widened over it.
    """
    from peft import PeftType

    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    try:
        return peft_model(input_ids=input_ids, attention_mask=attention_mask).logits
    except ValueError as exc:
        if "past key values" not in str(exc) or peft_model.peft_config["default"].peft_type != PeftType.PREFIX_TUNING:
            raise
    cfg = peft_model.peft_config["default"]
    prefix_mask = torch.ones(input_ids.shape[0], cfg.num_virtual_tokens, dtype=attention_mask.dtype)
    return peft_model.base_model(
        input_ids=input_ids,
        attention_mask=torch.cat([prefix_mask, attention_mask], dim=1),
        past_key_values=peft_model.get_prompt(input_ids.shape[0]),
    ).logits
