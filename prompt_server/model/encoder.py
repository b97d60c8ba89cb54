"""Encoder-only classifiers (BERT, RoBERTa): mixed soft prompts in one bidirectional forward, each row's own head.

What PeftModelForSequenceClassification does for one input, row by row:

    prompt tuning, P-tuning   embeddings [virtual | input], mask widened over the virtual tokens, positions from 0
                              over both (RoBERTa: from padding_idx + 1, as for inputs_embeds); the pooler or the
                              head reads the first column, the first virtual token
    prefix tuning             the prefix as past keys/values of every layer, mask widened over it, positions of the
                              input start after the prefix (RoBERTa: counted over non-pad ids, plus the prefix)
    no adapter                the model's own forward

A batch lays rows out left-aligned (column 0 is what the head reads), padded on the right; prefixes sit in the
past columns, padded too; the mask hides every hole. Bidirectional attention does not care where a key sits, and
each row's positions are computed by the embeddings' own rules, so a row sees exactly what it sees alone.
Heads: the model's own head module, called with each adapter's weights (PEFT's modules_to_save copy).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.func import functional_call
from transformers import DynamicCache

from prompt_server.model.batch import PrefillRow
from prompt_server.model.forward import HFModel

# Encoder-only model types served (loaded with AutoModelForSequenceClassification); other encoders (model types
# with a masked-LM class) are refused at load rather than read as the causal LM some of them also have a class for.
ENCODER_MODEL_TYPES = ("bert", "roberta")


class EncoderRunner:
    """Classify rows of mixed soft prompts in one forward of an *ForSequenceClassification model."""

    family = "encoder"
    generates = False
    caches_prompts = False

    def __init__(self, model: HFModel):
        self.model = model
        self.backbone = getattr(model, model.base_model_prefix)
        self.embeddings = self.backbone.embeddings
        self.word_embeddings = self.backbone.get_input_embeddings()
        self.head = classifier_head(model)
        # BertForSequenceClassification pools ([CLS] through a dense + tanh), RoBERTa's head reads column 0 itself;
        # PEFT's prefix path makes the same choice (the pooled output when the backbone returns one).
        self.pooler = getattr(self.backbone, "pooler", None)

    def _positions(self, row: PrefillRow) -> torch.Tensor:
        """Row's positions [embed_len], by the model's own rules for a batch of one."""
        emb, p = self.embeddings, row.prefix_len
        n = row.embed_len
        if hasattr(emb, "create_position_ids_from_input_ids"):  # RoBERTa family: positions after padding_idx
            if row.virtual is not None:  # PEFT passes inputs_embeds: sequential from padding_idx + 1
                return torch.arange(emb.padding_idx + 1, emb.padding_idx + 1 + n)
            ids = torch.tensor([row.ids])
            return emb.create_position_ids_from_input_ids(ids, emb.padding_idx, p)[0]
        return torch.arange(p, p + n)

    @torch.inference_mode()
    def hidden(self, rows: list[PrefillRow]) -> torch.Tensor:
        """Rows -> what the head reads: the pooled output [n, hidden] or the first column's states [n, 1, hidden]."""
        device = self.word_embeddings.weight.device
        n = len(rows)
        pmax = max(r.prefix_len for r in rows)
        s = max(r.embed_len for r in rows)
        x = self.word_embeddings.weight.new_zeros(n, s, self.word_embeddings.weight.shape[1])
        mask = torch.zeros(n, pmax + s, dtype=torch.long)
        positions = torch.zeros(n, s, dtype=torch.long)
        for i, r in enumerate(rows):
            v = 0 if r.virtual is None else r.virtual.shape[0]
            if r.virtual is not None:
                x[i, :v] = r.virtual.to(x.dtype)
            x[i, v : v + len(r.ids)] = self.word_embeddings(torch.tensor(r.ids, device=device))
            mask[i, : r.prefix_len] = 1
            mask[i, pmax : pmax + r.embed_len] = 1
            positions[i, : r.embed_len] = self._positions(r)
        cache = self._prefix_cache(rows, pmax, x) if pmax else None
        out = self.backbone(
            inputs_embeds=x,
            attention_mask=mask.to(device),
            position_ids=positions.to(device),
            token_type_ids=torch.zeros(n, s, dtype=torch.long, device=device),
            past_key_values=cache,
        )
        if self.pooler is not None:
            return out.pooler_output
        return out.last_hidden_state[:, :1]  # the heads served read column 0 (the self-check proves it at load)

    def _prefix_cache(self, rows: list[PrefillRow], pmax: int, x: torch.Tensor) -> DynamicCache:
        ref = next(r.prefix for r in rows if r.prefix is not None)  # [L, 2, heads, P, d]
        n_layers, _, heads, _, d = ref.shape
        past = x.new_zeros(n_layers, 2, len(rows), heads, pmax, d)
        for i, r in enumerate(rows):
            if r.prefix is not None:
                past[:, :, i, :, : r.prefix_len] = r.prefix.to(x.dtype)
        return DynamicCache(ddp_cache_data=[(past[layer, 0], past[layer, 1]) for layer in range(n_layers)])

    @torch.inference_mode()
    def scores(self, pooled: torch.Tensor, params: dict[str, torch.Tensor] | None) -> torch.Tensor:
        """What the head gives for rows that share it: [n, ...] -> [n, num_labels] float32; params None = the
        model's own head."""
        if params is None:
            return self.head(pooled).float()
        return functional_call(self.head, params, (pooled,)).float()


def classifier_head(model: Any) -> torch.nn.Module:
    """The *ForSequenceClassification model's head module (PEFT's modules_to_save names: classifier or score)."""
    return model.classifier if hasattr(model, "classifier") else model.score


def head_shapes(model: Any) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """The model's head parameters with the label count as -1: what an adapter's head must hold."""
    head = classifier_head(model)
    linears = [m for m in head.modules() if isinstance(m, torch.nn.Linear)]
    out_layer = linears[-1]
    out = []
    for name, p in head.named_parameters():
        owner = head.get_submodule(name.rpartition(".")[0]) if "." in name else head
        shape = tuple(p.shape)
        if owner is out_layer:
            shape = (-1, *shape[1:])
        out.append((name, shape))
    return tuple(out)
