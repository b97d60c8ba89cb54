"""The encoder-decoder architectures served: how one decoder layer, the decoder's embeddings and the output work
in T5 (and mT5) and in BART. The machinery they share is model/seq2seq.py's."""

from __future__ import annotations

from prompt_server.model.forward import HFModel
from prompt_server.model.seq2seq import Seq2SeqRunner

# The encoder-decoder model types whose decoder is written out here (mT5 is T5's architecture).
SEQ2SEQ_MODEL_TYPES = ("t5", "mt5", "bart")


class T5Runner(Seq2SeqRunner):
    """T5 and mT5: pre-norm blocks (RMS norms), unscaled attention, a relative position bias on the decoder's
    self-attention (layer 0's table, shared by all layers), T5's output scaled by d_model^-0.5 where its config
    says so."""

    def __init__(self, model: HFModel):
        super().__init__(model)
        attn = self.decoder.block[0].layer[0].SelfAttention
        self.n_heads, self.head_dim = attn.n_heads, attn.key_value_proj_dim
        self.attn_scale = attn.scaling  # 1.0: T5 folds the scale into its weights
        self.rel = attn
        # T5ForConditionalGeneration scales the decoder's output by d_model^-0.5 when the config says so
        # (scale_decoder_outputs: original T5, not v1.1); MT5ForConditionalGeneration never does
        cfg = model.config
        scaled = cfg.model_type == "t5" and getattr(cfg, "scale_decoder_outputs", cfg.tie_word_embeddings)
        self.out_scale = cfg.d_model ** -0.5 if scaled else 1.0

    def decoder_layers(self):
        return self.decoder.block

    def cross_kv_proj(self):
        return [(b.layer[1].EncDecAttention.k, b.layer[1].EncDecAttention.v) for b in self.decoder.block]

    def embed_decoder(self, ids, positions):
        return self.decoder.embed_tokens(ids)

    def self_bias(self, relative):
        a = self.rel
        buckets = a._relative_position_bucket(relative, bidirectional=False, num_buckets=a.relative_attention_num_buckets,
                                              max_distance=a.relative_attention_max_distance)
        return a.relative_attention_bias(buckets).t()[None, :, None, :]  # [1, H, 1, W]

    def layer(self, i, x, step):
        block = self.decoder.block[i]
        sa, ca = block.layer[0], block.layer[1]
        att = sa.SelfAttention
        x = x + att.o(step.self_attention(i, sa.layer_norm(x), (att.q, att.k, att.v)))
        x = x + ca.EncDecAttention.o(step.cross_attention(i, ca.layer_norm(x), ca.EncDecAttention.q))
        return block.layer[-1](x)  # the feed-forward layer, its norm and residual included

    def final(self, x):
        return self.decoder.final_layer_norm(x)

    def logits(self, hidden):
        return super().logits(hidden * self.out_scale if self.out_scale != 1.0 else hidden)


class BartRunner(Seq2SeqRunner):
    """BART: post-norm layers, learned positions (offset 2) read at each row's own position, scaled queries, a
    final logits bias."""

    def __init__(self, model: HFModel):
        super().__init__(model)
        attn = self.decoder.layers[0].self_attn
        self.n_heads, self.head_dim = attn.num_heads, attn.head_dim
        self.attn_scale = attn.scaling
        self.logits_bias = model.final_logits_bias

    def decoder_layers(self):
        return self.decoder.layers

    def cross_kv_proj(self):
        return [(la.encoder_attn.k_proj, la.encoder_attn.v_proj) for la in self.decoder.layers]

    def embed_decoder(self, ids, positions):
        table = self.decoder.embed_positions
        x = self.decoder.embed_tokens(ids) + table.weight[positions + table.offset]
        return self.decoder.layernorm_embedding(x)

    def layer(self, i, x, step):
        la = self.decoder.layers[i]
        sa, ca = la.self_attn, la.encoder_attn
        x = la.self_attn_layer_norm(x + sa.out_proj(step.self_attention(i, x, (sa.q_proj, sa.k_proj, sa.v_proj))))
        x = la.encoder_attn_layer_norm(x + ca.out_proj(step.cross_attention(i, x, ca.q_proj)))
        return la.final_layer_norm(x + la.fc2(la.activation_fn(la.fc1(x))))

    def logits(self, hidden):
        return super().logits(hidden) + self.logits_bias[0].float()


def make_seq2seq_runner(model: HFModel) -> Seq2SeqRunner:
    model_type = model.config.model_type
    if model_type in ("t5", "mt5"):
        return T5Runner(model)
    if model_type == "bart":
        return BartRunner(model)
    raise ValueError(f"model_type {model_type!r} has no encoder-decoder runner: served are "
                     f"{', '.join(SEQ2SEQ_MODEL_TYPES)}")
