"""A single-request forward built from canonical adapter tensors, to compare with PeftModel."""

from __future__ import annotations

import torch
from transformers import DynamicCache

from prompt_server.adapters.types import SoftPrompt


@torch.no_grad()
def reference_logits(model, record: SoftPrompt | None, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits [T, vocab] over the real tokens of one request served with `record` (or no adapter)."""
    ids = input_ids.view(1, -1)  # [1, T]
    T = ids.shape[1]
    embeds = model.get_input_embeddings()(ids)  # [1, T, hidden]
    if record is None:
        return model(inputs_embeds=embeds, position_ids=torch.arange(T).view(1, -1)).logits[0]
    if record.virtual_tokens is not None:
        V = record.virtual_tokens.shape[0]
        embeds = torch.cat([record.virtual_tokens.unsqueeze(0).to(embeds.dtype), embeds], dim=1)  # [1, V+T, hidden]
        out = model(inputs_embeds=embeds, attention_mask=torch.ones(1, V + T, dtype=torch.long),
                    position_ids=torch.arange(V + T).view(1, -1))
        return out.logits[0, V:]
    prefix = record.prefix  # [L, 2, kv_heads, P, head_dim]
    P = prefix.shape[3]
    cache = DynamicCache()
    for layer in range(prefix.shape[0]):
        cache.update(prefix[layer, 0].unsqueeze(0), prefix[layer, 1].unsqueeze(0), layer)  # [1, kv, P, d]
    out = model(inputs_embeds=embeds, past_key_values=cache, attention_mask=torch.ones(1, P + T, dtype=torch.long),
                position_ids=torch.arange(P, P + T).view(1, -1), use_cache=True)
    return out.logits[0]


@torch.no_grad()
def reference_classify(model, record: SoftPrompt, input_ids: torch.Tensor) -> torch.Tensor:
    """Classifier logits [num_labels] from the last token's final hidden state, as SEQ_CLS models compute them."""
    ids = input_ids.view(1, -1)
    T = ids.shape[1]
    embeds = model.get_input_embeddings()(ids)
    kwargs: dict = {"output_hidden_states": True}
    if record.virtual_tokens is not None:
        V = record.virtual_tokens.shape[0]
        embeds = torch.cat([record.virtual_tokens.unsqueeze(0), embeds], dim=1)
        kwargs.update(attention_mask=torch.ones(1, V + T, dtype=torch.long),
                      position_ids=torch.arange(V + T).view(1, -1))
    else:
        prefix = record.prefix
        P = prefix.shape[3]
        cache = DynamicCache()
        for layer in range(prefix.shape[0]):
            cache.update(prefix[layer, 0].unsqueeze(0), prefix[layer, 1].unsqueeze(0), layer)
        kwargs.update(past_key_values=cache, attention_mask=torch.ones(1, P + T, dtype=torch.long),
                      position_ids=torch.arange(P, P + T).view(1, -1), use_cache=True)
    hidden = model(inputs_embeds=embeds, **kwargs).hidden_states[-1][0, -1]  # [hidden], after the final norm
    head = record.classifier
    logits = head.weight @ hidden
    return logits + head.bias if head.bias is not None else logits
