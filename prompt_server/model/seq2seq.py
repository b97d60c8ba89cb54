"""Encoder-decoder models (T5, mT5, BART): the encoder once per request, then decoder steps in the running batch.

Where PEFT's soft prompts go on these models (PeftModelForSeq2SeqLM, read from its code and checked against its
generate for a batch of one):

- prompt tuning and P-tuning: the first V rows of the adapter's table stand in front of the encoder's input (the
  mask is 1 over them; BART scales the real tokens' embeddings, not the virtual ones). The decoder gets nothing.
- prefix tuning: keys/values in front of the decoder's self-attention only (never the encoder, never the
  cross-attention). PEFT makes L prefix layers, L = the encoder's layer count, and decoder layer i takes prefix layer
  2i mod L. The decoder's first token sits at position P (T5's relative offsets run from -P, BART reads its
  learned position P).

A step runs one decoder token per row. Newcomers: the encoder over [virtual; prompt] (rows left-aligned, padding
masked), their cross-attention keys/values computed once and kept in the batch's cross cache (model/batch.py
CrossKV), then the decoder start token over the row's prefix. Running rows: self-attention over their slot of the
cache (right-aligned as for causal models, so a column difference is a position difference), cross-attention over
their slot of the cross cache. Newcomers and running rows go through the projections and feed-forward layers
together; only attention runs per part.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass

import torch

from prompt_server.adapters.types import SEQ2SEQ
from prompt_server.model.batch import KV, CrossKV, PrefillRow
from prompt_server.model.forward import DecodeInputs, HFModel, Runner


@dataclass
class Seq2SeqPrefill:
    """Newcomer rows: the encoder's input, each row's prefix, and the decoder start token."""

    enc_ids: torch.Tensor  # [n, E] prompt ids, left-aligned; pad where virtual tokens or padding sit
    enc_virtual_mask: torch.Tensor | None  # [n, E] True where a virtual token replaces the embedding
    virtual: torch.Tensor | None  # [sum V, hidden] in row order
    enc_mask: torch.Tensor  # [n, E] bool, True on each row's virtual and prompt columns
    past: torch.Tensor | None  # [decoder layers, 2, n, heads, Pmax, head_dim], right-aligned; None: no prefix
    mask: torch.Tensor  # [n, Pmax + 1] bool: the row's prefix columns and its start token
    positions: torch.Tensor  # [n, 1] the start token's position (the row's prefix length)
    ids: torch.Tensor  # [n, 1] the decoder start token

    @property
    def prefix_width(self) -> int:
        return 0 if self.past is None else self.past.shape[4]


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """bool mask -> 0 where True, -inf where False."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def _attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor, scale: float):
    """q [n, H, 1, d] over keys/values [n, H, W, d] with an additive bias broadcast to [n, H, 1, W]."""
    scores = torch.matmul(q, keys.transpose(-1, -2))
    if scale != 1.0:
        scores = scores * scale
    probs = (scores + bias).softmax(-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, values)  # [n, H, 1, d]


class Seq2SeqRunner(Runner[Seq2SeqPrefill]):
    """The shared machinery; T5Runner and BartRunner say how one decoder layer, the embeddings and the output work."""

    family = SEQ2SEQ
    caches_prompts = False  # a row's keys/values depend on its encoder input: no soft-prompt or prefix caching
    # set by each architecture from its attention modules
    n_heads: int
    head_dim: int
    attn_scale: float

    def __init__(self, model: HFModel):
        super().__init__(model)
        self.encoder = model.get_encoder()
        self.decoder = model.get_decoder()
        self.n_layers = len(self.decoder_layers())
        gen = model.generation_config
        self.decoder_start = gen.decoder_start_token_id
        if self.decoder_start is None:
            self.decoder_start = getattr(model.config, "decoder_start_token_id", None)
        if self.decoder_start is None:
            raise ValueError("the model has no decoder_start_token_id (generation_config.json or config.json)")
        self.forced_bos = gen.forced_bos_token_id
        self.forced_eos = gen.forced_eos_token_id
        # tokens the encoder reads at most: BART's learned positions run out, T5's relative ones do not
        self.encoder_context = model.config.max_position_embeddings if model.config.model_type == "bart" else None

    # ---- per architecture ----------------------------------------------------------------------------------
    @abstractmethod
    def decoder_layers(self) -> list[torch.nn.Module]:
        """The decoder's layers, in order."""

    @abstractmethod
    def embed_decoder(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """[N] ids at [N] positions -> [N, hidden]."""

    @abstractmethod
    def layer(self, i: int, x: torch.Tensor, step: _Step) -> torch.Tensor:
        """Decoder layer i over the step's tokens x [N, hidden]; attention through `step`."""

    def final(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def heads(self, t: torch.Tensor) -> torch.Tensor:
        """[n, E, heads * d] -> [n, heads, E, d]."""
        return t.view(*t.shape[:2], self.n_heads, self.head_dim).transpose(1, 2)

    @abstractmethod
    def cross_kv_proj(self) -> list[tuple[torch.nn.Module, torch.nn.Module]]:
        """Each decoder layer's cross-attention key and value projections."""

    def self_bias(self, relative: torch.Tensor) -> torch.Tensor | None:
        """Position bias added to self-attention scores for key offsets `relative` [W] -> [1, H, 1, W] or None."""
        return None

    # ---- the engine's interface ----------------------------------------------------------------------------
    def build_prefill(self, rows: list[PrefillRow], pad_id: int, device: torch.device) -> Seq2SeqPrefill:
        n = len(rows)
        e = max(r.embed_len for r in rows)
        pmax = max(r.prefix_len for r in rows)
        enc_ids = torch.full((n, e), pad_id, dtype=torch.long)
        enc_mask = torch.zeros(n, e, dtype=torch.bool)
        mask = torch.zeros(n, pmax + 1, dtype=torch.bool)
        positions = torch.zeros(n, 1, dtype=torch.long)
        has_virtual = any(r.virtual is not None for r in rows)
        virtual_mask = torch.zeros(n, e, dtype=torch.bool) if has_virtual else None
        for i, r in enumerate(rows):
            v = r.embed_len - len(r.ids)
            enc_ids[i, v : r.embed_len] = torch.tensor(r.ids, dtype=torch.long)
            enc_mask[i, : r.embed_len] = True
            if virtual_mask is not None:
                virtual_mask[i, :v] = True
            mask[i, pmax - r.prefix_len :] = True
            positions[i, 0] = r.prefix_len
        past = None
        if pmax:
            ref = next(r.prefix for r in rows if r.prefix is not None)
            n_prefix, _, heads, _, d = ref.shape
            # decoder layer i takes prefix layer 2i mod L, as PEFT's get_prompt hands them out
            which = torch.tensor([(2 * i) % n_prefix for i in range(self.n_layers)], device=ref.device)
            past = torch.zeros(self.n_layers, 2, n, heads, pmax, d, dtype=ref.dtype, device=ref.device)
            for i, r in enumerate(rows):
                if r.prefix is not None:
                    past[:, :, i, :, pmax - r.prefix_len :] = r.prefix.index_select(0, which)
        virtual = torch.cat([r.virtual for r in rows if r.virtual is not None]) if has_virtual else None
        return Seq2SeqPrefill(
            enc_ids=enc_ids.to(device),
            enc_virtual_mask=None if virtual_mask is None else virtual_mask.to(device),
            virtual=virtual,
            enc_mask=enc_mask.to(device),
            past=past,
            mask=mask.to(device),
            positions=positions.to(device),
            ids=torch.full((n, 1), self.decoder_start, dtype=torch.long, device=device),
        )

    def encode(self, inputs: Seq2SeqPrefill) -> torch.Tensor:
        """The encoder over each row's virtual tokens and prompt -> [n, E, hidden]."""
        x = self.embed_tokens(inputs.enc_ids)  # the model's own input embeddings (BART's scale included)
        if inputs.virtual is not None:
            x = x.clone()
            x[inputs.enc_virtual_mask] = inputs.virtual.to(x.dtype)
        return self.encoder(inputs_embeds=x, attention_mask=inputs.enc_mask.long()).last_hidden_state

    def label_scores(self, rows: list[PrefillRow], label_ids: list[list[int]], pad_id: int,
                     device: torch.device) -> torch.Tensor:
        """Each label's log-probability as the decoder's continuation of the start token, for each row's input:
        -> [rows, labels]. The encoder runs once per row; its keys/values are shared by the row's labels."""
        n, m = len(rows), len(label_ids)
        k = max(len(lab) for lab in label_ids)
        inputs = self.build_prefill(rows, pad_id, device)
        hidden, kv = self.prefill(inputs, spare=k)
        labels = torch.full((m, k), pad_id, dtype=torch.long, device=device)
        for j, lab in enumerate(label_ids):
            labels[j, : len(lab)] = torch.tensor(lab, device=device)
        tokens = labels.repeat(n, 1)  # [n*m, k]: row i's labels at rows i*m .. i*m+m-1

        def each(t: torch.Tensor) -> torch.Tensor:
            return t.repeat_interleave(m, dim=0)

        cross = kv.cross
        assert cross is not None  # an encoder-decoder prefill always leaves one
        kv = KV([each(t) for t in kv.keys], [each(t) for t in kv.values], kv.width,
                CrossKV([each(t) for t in cross.keys], [each(t) for t in cross.values], each(cross.mask)))
        logp = [each(self.logits(hidden[:, -1]).log_softmax(-1)).gather(-1, tokens[:, :1])[:, 0]]
        mask, positions = each(inputs.mask), each(inputs.positions[:, -1] + 1)
        for t in range(1, k):
            mask = torch.cat([mask, mask.new_ones(n * m, 1)], dim=1)
            out = self.decode(DecodeInputs(tokens[:, t - 1], kv, mask, positions))
            logp.append(self.logits(out).log_softmax(-1).gather(-1, tokens[:, t : t + 1])[:, 0])
            positions = positions + 1
        lengths = torch.tensor([len(lab) for lab in label_ids], device=device).repeat(n)
        valid = torch.arange(k, device=device)[None, :] < lengths[:, None]
        return torch.where(valid, torch.stack(logp, dim=1), 0.0).sum(dim=1).view(n, m)

    def prefill(self, inputs: Seq2SeqPrefill, spare: int) -> tuple[torch.Tensor, KV]:
        _, [(hidden, kv)] = self.step(None, [(inputs, spare)])
        return hidden, kv

    def decode(self, inputs: DecodeInputs) -> torch.Tensor:
        hidden, _ = self.step(inputs, [])
        return hidden

    def step(self, decode: DecodeInputs | None, groups: list[tuple[Seq2SeqPrefill, int]]):
        parts: list[_Running | _Newcomers] = []
        if decode is not None:
            parts.append(_Running(self, decode))
        parts += [_Newcomers(self, inputs, spare) for inputs, spare in groups]
        ids = torch.cat([p.ids for p in parts])
        positions = torch.cat([p.positions for p in parts])
        step = _Step(parts)
        x = self.embed_decoder(ids, positions)  # [N, hidden], one token per row
        for i in range(self.n_layers):
            x = self.layer(i, x, step)
        x = self.final(x)
        results = [p.finish(x[a:b]) for p, (a, b) in zip(parts, step.bounds)]
        if decode is not None:
            return results[0], results[1:]
        return None, results


class _Step:
    """A step's parts and where each one's rows sit among the step's tokens."""

    def __init__(self, parts):
        self.parts = parts
        self.bounds = []
        start = 0
        for p in parts:
            self.bounds.append((start, start + p.n))
            start += p.n

    def self_attention(self, i: int, h: torch.Tensor, proj) -> torch.Tensor:
        """Self-attention of layer i for every row: h [N, hidden], proj = (q, k, v) modules -> [N, heads*d]."""
        q, k, v = proj[0](h), proj[1](h), proj[2](h)
        outs = [p.attend_self(i, q[a:b], k[a:b], v[a:b]) for p, (a, b) in zip(self.parts, self.bounds)]
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    def cross_attention(self, i: int, h: torch.Tensor, q_proj) -> torch.Tensor:
        q = q_proj(h)
        outs = [p.attend_cross(i, q[a:b]) for p, (a, b) in zip(self.parts, self.bounds)]
        return torch.cat(outs) if len(outs) > 1 else outs[0]


class _Running:
    """The running rows' next token: self-attention over their slots of the cache (the new key/value written into
    column kv.width), cross-attention over their slots of the cross cache. Free slots between used ones see only
    the new column and their first encoder column, so they stay finite; their outputs are dropped."""

    def __init__(self, r: Seq2SeqRunner, inputs: DecodeInputs):
        self.r, self.kv, self.slots, self.start = r, inputs.kv, inputs.slots, inputs.start
        self.kv.reserve(1)
        self.col = self.kv.width
        self.ids, self.positions = inputs.ids, inputs.positions
        self.n = len(inputs.ids)
        self.span = self.n if self.slots is None else int(self.slots[-1]) + 1
        dtype = r.embed_tokens.weight.dtype
        mask = inputs.mask[: self.span, self.start :]
        cross = self.kv.cross
        assert cross is not None  # every running row of an encoder-decoder batch has its cross-attention keys
        self.cross = cross
        cmask = cross.mask[: self.span]
        if self.slots is not None:
            mask, cmask = mask.clone(), cmask.clone()
            mask[:, -1] = True
            cmask[:, 0] = True
            cmask[self.slots] = cross.mask[self.slots]
        self.bias = _additive(mask, dtype)[:, None, None, :]  # [span, 1, 1, W]
        pos = r.self_bias(torch.arange(self.start, self.col + 1, device=mask.device) - self.col)
        if pos is not None:
            self.bias = self.bias + pos
        self.cross_bias = _additive(cmask, dtype)[:, None, None, :]

    def _spread(self, t: torch.Tensor) -> torch.Tensor:
        """[n, H, 1, d] in row order -> [span, H, 1, d] in slot order."""
        if self.slots is None:
            return t
        return t.new_zeros(self.span, *t.shape[1:]).index_copy_(0, self.slots, t)

    def _gather(self, out: torch.Tensor) -> torch.Tensor:
        if self.slots is not None:
            out = out[self.slots]
        return out.reshape(self.n, -1)

    def attend_self(self, i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        r, n = self.r, self.n
        keys, values = self.kv.keys[i], self.kv.values[i]
        rows = slice(0, n) if self.slots is None else self.slots
        keys[rows, :, self.col] = k.reshape(n, r.n_heads, r.head_dim)
        values[rows, :, self.col] = v.reshape(n, r.n_heads, r.head_dim)
        cols = slice(self.start, self.col + 1)
        q = self._spread(q.reshape(n, r.n_heads, 1, r.head_dim))
        out = _attend(q, keys[: self.span, :, cols], values[: self.span, :, cols], self.bias, r.attn_scale)
        return self._gather(out)

    def attend_cross(self, i: int, q: torch.Tensor) -> torch.Tensor:
        r, cross = self.r, self.cross
        q = self._spread(q.reshape(self.n, r.n_heads, 1, r.head_dim))
        out = _attend(q, cross.keys[i][: self.span], cross.values[i][: self.span], self.cross_bias, r.attn_scale)
        return self._gather(out)

    def finish(self, hidden: torch.Tensor) -> torch.Tensor:
        self.kv.width += 1
        return hidden  # [n, hidden]


class _Newcomers:
    """New rows: the encoder runs now and leaves their cross-attention keys/values; the start token attends to the
    row's prefix (right-aligned in Pmax columns) and itself. Each row gets a cache with `spare` free columns."""

    def __init__(self, r: Seq2SeqRunner, inputs: Seq2SeqPrefill, spare: int):
        self.r, self.inputs, self.spare = r, inputs, spare
        self.n = inputs.ids.shape[0]
        self.ids, self.positions = inputs.ids[:, 0], inputs.positions[:, 0]
        self.pw = inputs.prefix_width
        self.width = self.pw + 1
        enc = r.encode(inputs)  # [n, E, hidden]
        self.cross_keys, self.cross_values = [], []
        for k_proj, v_proj in r.cross_kv_proj():
            self.cross_keys.append(r.heads(k_proj(enc)))  # [n, H, E, d]
            self.cross_values.append(r.heads(v_proj(enc)))
        dtype = enc.dtype
        self.bias = _additive(inputs.mask, dtype)[:, None, None, :]  # [n, 1, 1, Pmax+1]
        pos = r.self_bias(torch.arange(self.width, device=enc.device) - self.pw)
        if pos is not None:
            self.bias = self.bias + pos
        self.cross_bias = _additive(inputs.enc_mask, dtype)[:, None, None, :]
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    def attend_self(self, i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        r, n, pw = self.r, self.n, self.pw
        kc = k.new_zeros(n, r.n_heads, self.width + self.spare, r.head_dim)
        vc = torch.zeros_like(kc)
        if self.inputs.past is not None:
            kc[:, :, :pw] = self.inputs.past[i, 0]
            vc[:, :, :pw] = self.inputs.past[i, 1]
        kc[:, :, pw] = k.reshape(n, r.n_heads, r.head_dim)
        vc[:, :, pw] = v.reshape(n, r.n_heads, r.head_dim)
        self.keys.append(kc)
        self.values.append(vc)
        q = q.reshape(n, r.n_heads, 1, r.head_dim)
        out = _attend(q, kc[:, :, : self.width], vc[:, :, : self.width], self.bias, r.attn_scale)
        return out.reshape(n, -1)

    def attend_cross(self, i: int, q: torch.Tensor) -> torch.Tensor:
        r = self.r
        q = q.reshape(self.n, r.n_heads, 1, r.head_dim)
        out = _attend(q, self.cross_keys[i], self.cross_values[i], self.cross_bias, r.attn_scale)
        return out.reshape(self.n, -1)

    def finish(self, hidden: torch.Tensor) -> tuple[torch.Tensor, KV]:
        cross = CrossKV(self.cross_keys, self.cross_values, self.inputs.enc_mask)
        return hidden[:, None, :], KV(self.keys, self.values, self.width, cross=cross)  # hidden [n, 1, hidden]
