"""The canonical, immutable in-memory form of a soft-prompt adapter, and what it is checked against."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

PROMPT_TUNING = "PROMPT_TUNING"
P_TUNING = "P_TUNING"
PREFIX_TUNING = "PREFIX_TUNING"
SOFT_PROMPT_TYPES = (PROMPT_TUNING, P_TUNING, PREFIX_TUNING)


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

    @classmethod
    def from_config(cls, config: Any) -> ModelSpec:
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(
            model_type=config.model_type,
            hidden_size=config.hidden_size,
            num_layers=config.num_hidden_layers,
            num_attention_heads=heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            vocab_size=config.vocab_size,
        )


@dataclass(frozen=True)
class ClassifierHead:
    """A SEQ_CLS head applied to the last token's final hidden state."""

    weight: torch.Tensor  # [num_labels, hidden]
    bias: torch.Tensor | None  # [num_labels]


@dataclass(frozen=True)
class SoftPrompt:
    """One published version of an adapter. Never mutated; replacing an adapter publishes a new object."""

    id: str
    version: int
    peft_type: str  # PROMPT_TUNING | P_TUNING | PREFIX_TUNING
    task_type: str  # CAUSAL_LM | SEQ_CLS
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
