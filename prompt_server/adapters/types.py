"""The canonical, immutable in-memory form of a soft-prompt adapter, and what it is checked against."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

PROMPT_TUNING = "PROMPT_TUNING"
P_TUNING = "P_TUNING"
PREFIX_TUNING = "PREFIX_TUNING"
SOFT_PROMPT_TYPES = (PROMPT_TUNING, P_TUNING, PREFIX_TUNING)


CAUSAL = "causal"  # decoder-only LMs: generation, and classification by verbalizers or a SEQ_CLS head
ENCODER = "encoder"  # encoder-only classifiers (BERT, RoBERTa): classification only
SEQ2SEQ = "seq2seq"  # encoder-decoder LMs (T5, BART): generation, and classification by verbalizers
# The PEFT task types each model family serves.
FAMILY_TASKS = {CAUSAL: ("CAUSAL_LM", "SEQ_CLS"), ENCODER: ("SEQ_CLS",), SEQ2SEQ: ("SEQ_2_SEQ_LM",)}
FAMILY_NAMES = {CAUSAL: "a decoder-only causal LM", ENCODER: "an encoder-only classifier",
                SEQ2SEQ: "an encoder-decoder LM"}


@dataclass(frozen=True)
class ModelSpec:
    """The base-model dimensions an adapter must agree with."""

    model_type: str
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    family: str = CAUSAL
    # The model's own classifier head (encoders): (parameter name, shape) with the label count as -1. None: a
    # causal LM, whose SEQ_CLS head is one linear layer on the last token, [num_labels, hidden] (+ bias).
    head: tuple[tuple[str, tuple[int, ...]], ...] | None = None
    # Encoder-decoder models: the decoder's layer count (num_layers counts the encoder's, as PEFT does); else 0.
    decoder_layers: int = 0

    @classmethod
    def from_config(cls, config: Any, family: str = CAUSAL, head=None) -> ModelSpec:
        heads = config.num_attention_heads
        # T5's head size is its own setting (d_kv), not hidden_size / heads
        head_dim = getattr(config, "head_dim", None) or getattr(config, "d_kv", None) or config.hidden_size // heads
        return cls(
            model_type=config.model_type,
            hidden_size=config.hidden_size,
            num_layers=config.num_hidden_layers,
            num_attention_heads=heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            vocab_size=config.vocab_size,
            family=family,
            head=head,
            decoder_layers=(getattr(config, "num_decoder_layers", None) or getattr(config, "decoder_layers", None)
                            or config.num_hidden_layers) if family == SEQ2SEQ else 0,
        )

    @property
    def head_template(self) -> tuple[tuple[str, tuple[int, ...]], ...]:
        return self.head or (("weight", (-1, self.hidden_size)), ("bias", (-1,)))


@dataclass(frozen=True)
class ClassifierHead:
    """A SEQ_CLS head: its parameters by the names of the model's head module (a causal LM's: weight, bias)."""

    params: dict[str, torch.Tensor]
    num_labels: int

    @property
    def weight(self) -> torch.Tensor:  # causal LMs: [num_labels, hidden]
        return self.params["weight"]

    @property
    def bias(self) -> torch.Tensor | None:
        return self.params.get("bias")


@dataclass(frozen=True)
class SoftPrompt:
    """One published version of an adapter. Never mutated; replacing an adapter publishes a new object."""

    id: str
    version: int
    peft_type: str  # PROMPT_TUNING | P_TUNING | PREFIX_TUNING
    task_type: str  # CAUSAL_LM | SEQ_CLS | SEQ_2_SEQ_LM
    num_virtual_tokens: int
    sha256: str  # of the stored weights file
    size_bytes: int  # of the stored files together
    created_at: float  # unix time this version was published
    virtual_tokens: torch.Tensor | None = None  # [V, hidden], prompt tuning and P-tuning
    prefix: torch.Tensor | None = None  # [L, 2, kv_heads, P, head_dim], prefix tuning; [l, 0] keys, [l, 1] values
    classifier: ClassifierHead | None = None
    labels: tuple[str, ...] | None = None
    base_model: str | None = None  # base_model_name_or_path from the adapter config, informational
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def is_prefix(self) -> bool:
        return self.prefix is not None
