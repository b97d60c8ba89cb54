"""Forward passes over a mixed batch: a lean path for Llama-family models and a generic one for any HF causal LM.

Both take the layout of batch.py and return final-layer hidden states (after the last norm); logits are computed
only for the positions that need them.
"""

from __future__ import annotations

import inspect
import sys
from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from prompt_server.model.batch import KV, PrefillInputs, embed


class Runner(ABC):
    """What the engine needs from a model: prefill new rows, decode one token for all rows, project to logits."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.lm_head = model.get_output_embeddings()
        self.embed_tokens = model.get_input_embeddings()
        cfg = model.config
        # What some families' *ForCausalLM.forward does after lm_head (Gemma 2's soft-capping, Cohere's and
        # Granite's scaling); the start-up self-check catches any other difference.
        self.softcap = getattr(cfg, "final_logit_softcapping", None)
        self.logit_scale = getattr(cfg, "logit_scale", None) if cfg.model_type.startswith("cohere") else None
        self.divide = getattr(cfg, "logits_scaling", None) if cfg.model_type.startswith("granite") else None
        self.packed_head = _packed_linear(self.lm_head)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., hidden] -> [..., vocab] float32."""
        if self.packed_head is not None:
            logits = self.packed_head(hidden.reshape(-1, hidden.shape[-1])).view(*hidden.shape[:-1], -1)
        else:
            logits = self.lm_head(hidden)
        if self.logit_scale is not None:
            logits = logits * self.logit_scale
        if self.divide is not None:
            logits = logits / self.divide
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits.float()

    @abstractmethod
    def prefill(self, inputs: PrefillInputs, spare: int) -> tuple[torch.Tensor, KV]:
        """Run new rows; -> hidden [n, S, hidden] and their cache with `spare` free columns."""

    @abstractmethod
    def decode(self, ids: torch.Tensor, kv: KV, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """One token per row: ids [B], mask [B, W+1] bool, positions [B] -> hidden [B, hidden]; kv grows by one."""


def _packed_linear(linear: torch.nn.Module) -> torch.nn.Module | None:
    """On the CPU in float32, a oneDNN copy of `linear` with its weight prepacked: the vocabulary projection, the
    largest matrix a decode step multiplies, runs about twice as fast (a second copy of its weight is the price)."""
    weight = getattr(linear, "weight", None)
    if (not isinstance(linear, torch.nn.Linear) or weight.device.type != "cpu" or weight.dtype != torch.float32
            or not torch.backends.mkldnn.is_available()):
        return None
    from torch.utils.mkldnn import MkldnnLinear

    return MkldnnLinear(linear, torch.float32)


def make_runner(model: torch.nn.Module, forward_path: str = "lean") -> Runner:
    """The runner for a forward path chosen by compat.plan ("lean" or "generic")."""
    return LlamaRunner(model) if forward_path == "lean" else HFRunner(model)


class HFRunner(Runner):
    """Any HF causal LM: the model's own forward with a DynamicCache, 2-D mask with holes, explicit positions."""

    def __init__(self, model: torch.nn.Module):
        super().__init__(model)
        self.base = model.base_model
        # transformers 5.24 renamed the forward's `past_key_values` to `cache` (the old name is deprecated).
        self.cache_arg = "cache" if "cache" in inspect.signature(self.base.forward).parameters else "past_key_values"

    def _cache(self, keys: list[torch.Tensor], values: list[torch.Tensor]) -> DynamicCache:
        return DynamicCache(ddp_cache_data=list(zip(keys, values)))

    def prefill(self, inputs: PrefillInputs, spare: int) -> tuple[torch.Tensor, KV]:
        x = embed(inputs, self.embed_tokens)  # [n, S, hidden]
        if inputs.past is not None:
            cache = self._cache([p[0] for p in inputs.past], [p[1] for p in inputs.past])
        else:
            cache = DynamicCache()
        out = self.base(
            inputs_embeds=x,
            attention_mask=inputs.mask.long(),
            position_ids=inputs.positions,
            use_cache=True,
            **{self.cache_arg: cache},
        )
        kv = KV([la.keys for la in cache.layers], [la.values for la in cache.layers], x.shape[1] + inputs.prefix_width)
        return out.last_hidden_state, kv

    def decode(self, ids: torch.Tensor, kv: KV, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        views = [kv.layer(i) for i in range(len(kv.keys))]
        cache = self._cache([k for k, _ in views], [v for _, v in views])
        out = self.base(
            inputs_embeds=self.embed_tokens(ids[:, None]),
            attention_mask=mask.long(),
            position_ids=positions[:, None],
            use_cache=True,
            **{self.cache_arg: cache},
        )
        kv.keys = [la.keys for la in cache.layers]
        kv.values = [la.values for la in cache.layers]
        kv.width += 1
        return out.last_hidden_state[:, -1]


class LlamaRunner(Runner):
    """Llama-family forward written out: KV written in place, grouped-query attention without repeating KV heads."""

    def __init__(self, model: torch.nn.Module):
        super().__init__(model)
        inner = model.model
        self.layers = inner.layers
        self.norm = inner.norm
        self.rotary = inner.rotary_emb
        # Every value comes from the modules transformers built: head size, score scale, rotary application.
        attn = self.layers[0].self_attn
        self.head_dim = attn.head_dim
        self.n_kv = attn.k_proj.out_features // self.head_dim
        self.n_heads = attn.q_proj.out_features // self.head_dim
        self.attn_scale = attn.scaling
        self.apply_rotary = sys.modules[type(attn).__module__].apply_rotary_pos_emb

    def _rope(self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        # q: [B, H, S, d], k: [B, kv, S, d], cos/sin: [B, S, d]
        return self.apply_rotary(q, k, cos, sin)

    def _qkv(self, layer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        attn = layer.self_attn
        b, s, _ = x.shape
        h = layer.input_layernorm(x)
        q = attn.q_proj(h).view(b, s, self.n_heads, self.head_dim).transpose(1, 2)  # [B, H, S, d]
        k = attn.k_proj(h).view(b, s, self.n_kv, self.head_dim).transpose(1, 2)  # [B, kv, S, d]
        v = attn.v_proj(h).view(b, s, self.n_kv, self.head_dim).transpose(1, 2)  # [B, kv, S, d]
        q, k = self._rope(q, k, cos, sin)
        return q, k, v

    def _finish(self, layer, x: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        x = x + layer.self_attn.o_proj(attn_out)
        return x + layer.mlp(layer.post_attention_layernorm(x))

    def prefill(self, inputs: PrefillInputs, spare: int) -> tuple[torch.Tensor, KV]:
        x = embed(inputs, self.embed_tokens)  # [n, S, hidden]
        n, s, _ = x.shape
        pw = inputs.prefix_width
        width = pw + s
        cos, sin = self.rotary(x, inputs.positions)
        # mask: [n, 1, S, Pmax+S]; causal over the S columns, each row's holes closed; every query sees itself
        # so that padding rows stay finite (their outputs are never used).
        causal = torch.ones(s, s, dtype=torch.bool, device=x.device).tril()
        mask = inputs.mask[:, None, None, :].expand(n, 1, s, width).clone()
        mask[:, :, :, pw:] &= causal
        mask[:, :, :, pw:] |= torch.eye(s, dtype=torch.bool, device=x.device)
        ref = self.layers[0].self_attn.k_proj.weight
        keys, values = [], []
        for i, layer in enumerate(self.layers):
            q, k, v = self._qkv(layer, x, cos, sin)
            kc = ref.new_zeros(n, self.n_kv, width + spare, self.head_dim)
            vc = ref.new_zeros(n, self.n_kv, width + spare, self.head_dim)
            if inputs.past is not None:
                kc[:, :, :pw] = inputs.past[i, 0]
                vc[:, :, :pw] = inputs.past[i, 1]
            kc[:, :, pw:width] = k
            vc[:, :, pw:width] = v
            out = F.scaled_dot_product_attention(
                q, kc[:, :, :width], vc[:, :, :width], attn_mask=mask, scale=self.attn_scale, enable_gqa=True
            )  # [n, H, S, d]
            x = self._finish(layer, x, out.transpose(1, 2).reshape(n, s, -1))
            keys.append(kc)
            values.append(vc)
        return self.norm(x), KV(keys, values, width)

    def decode(self, ids: torch.Tensor, kv: KV, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        kv.reserve(1)
        x = self.embed_tokens(ids[:, None])  # [B, 1, hidden]
        b = x.shape[0]
        col = kv.width
        cos, sin = self.rotary(x, positions[:, None])
        group = self.n_heads // self.n_kv
        attn_mask = mask[:, None, None, :]  # [B, 1, 1, W+1]
        for i, layer in enumerate(self.layers):
            q, k, v = self._qkv(layer, x, cos, sin)
            kv.keys[i][:, :, col] = k[:, :, 0]
            kv.values[i][:, :, col] = v[:, :, 0]
            # one query per head: fold the heads that share a KV head into the query axis, no KV repeat needed
            qg = q.reshape(b, self.n_kv, group, self.head_dim)  # [B, kv, g, d]
            out = F.scaled_dot_product_attention(
                qg, kv.keys[i][:, :, : col + 1], kv.values[i][:, :, : col + 1], attn_mask=attn_mask, scale=self.attn_scale
            )  # [B, kv, g, d]
            x = self._finish(layer, x, out.reshape(b, 1, -1))
        kv.width += 1
        return self.norm(x)[:, -1]

