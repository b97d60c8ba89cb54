"""Forward passes over a mixed batch: a lean path for Llama-family models and a generic one for any HF causal LM.

Both take the layout of batch.py and return final-layer hidden states (after the last norm); logits are computed
only for the positions that need them.
"""

from __future__ import annotations

import inspect
import sys
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from prompt_server.model.batch import KV, Place, PrefillInputs, PrefillRow, build_prefill, embed

if TYPE_CHECKING:
    from prompt_server.model.graphs import DecodeGraphs

# A transformers PreTrainedModel. Typed loosely: its submodules and config fields depend on its architecture, and the
# start-up self-check, not the type checker, proves a runner reads them right.
HFModel = Any


# What a runner's prefill takes: model/batch.py's layout for causal LMs, model/seq2seq.py's for encoder-decoders.
InputsT = TypeVar("InputsT")


class Runner(ABC, Generic[InputsT]):
    """What the engine needs from a model: prefill new rows, decode one token for all rows, project to logits."""

    family = "causal"
    generates = True
    # A soft prompt's or a prompt head's keys/values are the same for every row that starts with it (causal
    # attention), so they can be cached (engine/prompt_kv.py, engine/prefix_cache.py).
    caches_prompts = True
    # Tokens the model's generation config forces (transformers' ForcedBOS/ForcedEOS logits processors): the first
    # generated token, and the last one a row may generate. Encoder-decoder models such as BART set them.
    forced_bos: int | None = None
    forced_eos: int | None = None
    # Whether a prefill gives its rows a cache with the free slots and lead columns PrefillInputs.with_room asks
    # for, so that the running rows can join the newcomers' cache (engine/engine.py) instead of the other way round.
    prefills_with_room = False
    # Whether decode steps read the shared keys/values in front of each row's tokens where they were copied from
    # (DecodeInputs.pieces): the CPU decode kernel does.
    reads_pieces = False

    def __init__(self, model: HFModel):
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
        self.head_kernel: Callable[..., torch.Tensor] | None = None  # model/native.py's projection, when proven

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., hidden] -> [..., vocab] float32."""
        rows = hidden.numel() // hidden.shape[-1]
        if self.head_kernel is not None and rows <= HEAD_ROWS:
            flat = hidden.reshape(rows, -1).contiguous()
            logits = self.head_kernel(flat, self.lm_head.weight, self.lm_head.bias).view(*hidden.shape[:-1], -1)
        elif self.packed_head is not None:
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
    def build_prefill(self, rows: list[PrefillRow], pad_id: int, device: torch.device) -> InputsT:
        """Newcomer rows laid out for prefill()."""

    @abstractmethod
    def prefill(self, inputs: InputsT, spare: int) -> tuple[torch.Tensor, KV]:
        """Run new rows; -> hidden [n, S, hidden] and their cache with `spare` free columns."""

    @abstractmethod
    def decode(self, inputs: DecodeInputs) -> torch.Tensor:
        """One token per running row -> hidden [n, hidden]; each row's keys/values go into column kv.width of its
        slot, and kv.width grows by one."""

    def step(self, decode: DecodeInputs | None, groups: list[tuple[InputsT, int]]):
        """The running rows' next token and newcomer groups' prompts in one step.

        -> (decode hidden [B, hidden] or None, [(prefill hidden [n, S, hidden], cache)] per group). Here one forward
        per part; runners that can share the weights between parts override it.
        """
        groups_out = [self.prefill(inputs, spare) for inputs, spare in groups]
        if decode is None:
            return None, groups_out
        return self.decode(decode), groups_out


# One packed copy per (frozen) module, shared by every runner built on it: the start-up self-check and the engine
# build runners over the same model.
_PACKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _packed_linear(linear: torch.nn.Module) -> torch.nn.Module | None:
    """On the CPU in float32, a oneDNN copy of `linear` with its weight prepacked: the vocabulary projection, the
    largest matrix a decode step multiplies, runs about twice as fast (a second copy of its weight is the price)."""
    if not isinstance(linear, torch.nn.Linear):
        return None
    weight = linear.weight
    if weight.device.type != "cpu" or weight.dtype != torch.float32 or not torch.backends.mkldnn.is_available():
        return None
    if linear not in _PACKED:
        from torch.utils.mkldnn import MkldnnLinear

        _PACKED[linear] = MkldnnLinear(linear, torch.float32)
    return _PACKED[linear]


def _linear(linear: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, linear.weight, linear.bias)


def _linear_weight_first(linear: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """`linear(x)` for x [N, in] computed as W @ x^T, returned as a [N, out] view of the [out, N] product.

    On the CPU, MKL multiplies a few rows by a large weight up to 1.7x faster in this orientation (the weight streams
    through once instead of being repacked per call: 30 layers of the default model at 32 rows, 154 ms -> 89 ms on
    an AVX2 EPYC). Elementwise ops keep the transposed layout, so the MLP's three products need no copies.
    """
    y = torch.mm(linear.weight, x.t())
    if linear.bias is not None:
        y += linear.bias[:, None]
    return y.t()


# Rows up to which a step's projections run on the CPU kernel (model/native.py, kernels/linear.cpp) rather than MKL:
# there each weight streams from memory once for all rows (the default model's 30 layers on an AVX2 EPYC, median of
# 9, scripts/linear_ab.py: 1-8 rows 37-43 instead of 50-82 ms, 16 rows 60 instead of 84, 32-40 rows 6-15% faster);
# at 48 rows the two are level.
FEW_ROWS = 40
# Rows up to which the vocabulary projection runs on the kernel rather than oneDNN's prepacked copy (the default
# model's 576 x 49152: 8-22 instead of 10-29 ms at 1-32 rows, 34 instead of 42 at 48; level at 64).
HEAD_ROWS = 48


def _kernel_fits(linear: torch.nn.Module) -> bool:
    return isinstance(linear, torch.nn.Linear) and linear.in_features % 8 == 0 and linear.weight.is_contiguous()


def _kernel_linear(kernel: Callable[..., torch.Tensor]) -> Linear:
    """A step's projections: by the kernel up to FEW_ROWS rows, by MKL (weight first) beyond. For layers whose every
    projection _kernel_fits (the runner checks once)."""
    def linear(module: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] <= FEW_ROWS:
            return kernel(x.contiguous(), module.weight, module.bias)
        return _linear_weight_first(module, x)

    return linear


def _kernel_rows(n: int) -> int:
    """Rows a step's products run with the kernel: as many as there are up to FEW_ROWS (the kernel has no slow
    counts), then as _cpu_rows."""
    return n if n <= FEW_ROWS else _cpu_rows(n)


def _cpu_rows(n: int) -> int:
    """How many rows a step's matrix multiplies run for n tokens on the CPU: at least 4, then a multiple of 8.

    MKL's float32 products with few rows are up to twice as slow for some row counts (31 rows: 150 ms for the default
    model's 30 layers, 32 rows: 90 ms; 9 rows: 80 ms, 16 rows: 60 ms; 1 row: 55 ms, 4 rows: 40 ms, on an AVX2 EPYC);
    zero rows up to the next multiple of 8 cost less than they save.
    """
    return 4 if n <= 4 else -(-n // 8) * 8


def make_runner(model: HFModel, forward_path: str = "lean", compiled: bool = False, native: bool = False,
                graphs: bool = False):
    """The runner for a serving plan's forward path: "lean" or "generic" (causal LMs), "encoder" (classifiers),
    "seq2seq" (encoder-decoder LMs). For the lean path, `compiled`: its layers compiled (model/compiled.py);
    `native`: decode attention by the server's CPU kernel (model/native.py, built by the loader); `graphs`: decode
    steps replayed as CUDA graphs (model/graphs.py) where the runner supports them."""
    if forward_path == "encoder":
        from prompt_server.model.encoder import EncoderRunner

        return EncoderRunner(model)
    if forward_path == "seq2seq":
        from prompt_server.model.seq2seq_models import make_seq2seq_runner

        return make_seq2seq_runner(model)
    return LlamaRunner(model, compiled, native, graphs) if forward_path == "lean" else HFRunner(model)


class CausalRunner(Runner[PrefillInputs]):
    """A decoder-only LM's runner: newcomers laid out as in model/batch.py."""

    def build_prefill(self, rows: list[PrefillRow], pad_id: int, device: torch.device) -> PrefillInputs:
        return build_prefill(rows, pad_id, device)


class HFRunner(CausalRunner):
    """Any HF causal LM: the model's own forward with a DynamicCache, 2-D mask with holes, explicit positions."""

    def __init__(self, model: HFModel):
        super().__init__(model)
        self.base = model.base_model
        # transformers 5.24 renamed the forward's `past_key_values` to `cache` (the old name is deprecated).
        self.cache_arg = "cache" if "cache" in inspect.signature(self.base.forward).parameters else "past_key_values"

    def _cache(self, keys: list[torch.Tensor], values: list[torch.Tensor]) -> DynamicCache:
        return DynamicCache(ddp_cache_data=list(zip(keys, values)))

    def prefill(self, inputs: PrefillInputs, spare: int) -> tuple[torch.Tensor, KV]:
        x = embed(inputs, self.embed_tokens)  # [n, S, hidden]
        past = inputs.past()
        if past is not None:
            cache = self._cache([p[0] for p in past], [p[1] for p in past])
        else:
            cache = DynamicCache()
        out = self.base(
            inputs_embeds=x,
            attention_mask=inputs.mask.long(),
            position_ids=inputs.positions,
            use_cache=True,
            **{self.cache_arg: cache},
        )
        layers: list[Any] = cache.layers  # DynamicLayer: keys and values [n, kv_heads, columns, head_dim]
        kv = KV([la.keys for la in layers], [la.values for la in layers], x.shape[1] + inputs.prefix_width)
        return out.last_hidden_state, kv

    def decode(self, inputs: DecodeInputs) -> torch.Tensor:
        kv, col, start = inputs.kv, inputs.kv.width, inputs.start
        kv.reserve(1)
        rows = slice(0, len(inputs.ids)) if inputs.slots is None else inputs.slots
        # the model's own cache appends a column to a copy of the rows' keys/values; the new column is then
        # written back into each row's slot
        cache = self._cache([k[rows, :, start:col] for k in kv.keys], [v[rows, :, start:col] for v in kv.values])
        out = self.base(
            inputs_embeds=self.embed_tokens(inputs.ids[:, None]),
            attention_mask=inputs.mask[rows, start:].long(),
            position_ids=inputs.positions[:, None],
            use_cache=True,
            **{self.cache_arg: cache},
        )
        layers: list[Any] = cache.layers
        for i, layer in enumerate(layers):
            kv.keys[i][rows, :, col] = layer.keys[:, :, -1]
            kv.values[i][rows, :, col] = layer.values[:, :, -1]
        kv.width += 1
        return out.last_hidden_state[:, -1]


class LlamaRunner(CausalRunner):
    """Llama-family forward written out: KV written in place, grouped-query attention without repeating KV heads.

    `step` runs the running rows' next tokens and any newcomers' prompts through the model together: norms,
    projections and MLPs see every token of the step at once (the weights are read once), attention runs per part.
    """

    prefills_with_room = True

    def __init__(self, model: HFModel, compiled: bool = False, native: bool = False, graphs: bool = False):
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
        cpu = model.device.type == "cpu"
        # a prefill's cache allocated for all layers at once, each soft prompt or cached head copied once for all
        # its layers (PrefillInputs.all_layers): off the CPU, where a step is bound by launching kernels
        self.whole_cache = not cpu
        self.linear: Linear = _linear_weight_first if cpu else _linear
        self.pad_rows = _cpu_rows if cpu else int
        self.decode_kernel = None
        self.place: Place | None = None
        if native:  # model/native.py: decode attention, few-row projections and prefix layout by the server's own
            from prompt_server.model.native import built  # CPU kernels

            kernels = built()
            self.decode_kernel = kernels.decode_attention
            self.reads_pieces = True
            self.place = kernels.layout
            projections = [m for layer in self.layers for m in (*layer.self_attn.children(), *layer.mlp.children())
                           if isinstance(m, torch.nn.Linear)]
            if all(_kernel_fits(m) for m in projections):  # else MKL serves them all, as without the kernels
                self.linear = _kernel_linear(kernels.linear)
                self.pad_rows = _kernel_rows
            if _kernel_fits(self.lm_head):
                self.head_kernel = kernels.linear
        self.compiled = None
        if compiled:  # model/compiled.py: the layers as one torch.compile graph, attention called back
            from prompt_server.model.compiled import MIN_ROWS, compiled_layers

            self.compiled = compiled_layers(model)
            self.pad_rows = lambda n: max(n, MIN_ROWS)
        self.graphs: DecodeGraphs | None = None
        if graphs:  # model/graphs.py: on a GPU, decode steps without newcomers replayed as CUDA graphs
            from prompt_server.model import graphs as cuda_graphs

            if cuda_graphs.supported(self) is None:
                self.graphs = cuda_graphs.DecodeGraphs(self)

    def prefill(self, inputs: PrefillInputs, spare: int) -> tuple[torch.Tensor, KV]:
        _, [(hidden, kv)] = self.step(None, [(inputs, spare)])
        return hidden, kv

    def decode(self, inputs: DecodeInputs) -> torch.Tensor:
        hidden, _ = self.step(inputs, [])
        return hidden

    def step(self, decode: DecodeInputs | None, groups: list[tuple[PrefillInputs, int]]):
        if decode is not None and not groups and self.graphs is not None:
            hidden = self.graphs.decode(decode)
            if hidden is not None:
                return hidden, []
        parts: list[_Part] = []
        if decode is not None:
            parts.append(_DecodePart(self, decode))
        parts += [_PrefillPart(self, inputs, spare) for inputs, spare in groups]
        x = torch.cat([p.x for p in parts]) if len(parts) > 1 else parts[0].x  # [N, hidden], every token
        bounds = []
        start = 0
        for p in parts:
            bounds.append((start, start + p.tokens))
            start += p.tokens
        # rows of zeros up to a count the matrix multiplies handle well; they belong to no part
        pad = self.pad_rows(start) - start
        if pad:
            x = torch.cat([x, x.new_zeros(pad, x.shape[1])])
            pad_out = x.new_zeros(pad, self.n_heads * self.head_dim)  # the pad rows' attention output, every layer

        def attend(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            """Layer i's attention for every part; q, k, v [N, *] -> [N, heads * head_dim]."""
            outs = [p.attend(i, q[a:b], k[a:b], v[a:b]) for p, (a, b) in zip(parts, bounds)]  # each [t, H*d]
            if pad:
                outs.append(pad_out)
            return torch.cat(outs) if len(outs) > 1 else outs[0]

        if self.compiled is not None:
            x = self.compiled(x, attend)
        else:
            x = run_layers(self.layers, self.norm, x, attend, self.linear)
        results = [p.finish(x[a:b]) for p, (a, b) in zip(parts, bounds)]
        if decode is not None:
            return results[0], results[1:]
        return None, results


Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
Linear = Callable[[torch.nn.Linear, torch.Tensor], torch.Tensor]


def run_layers(layers: Any, norm: torch.nn.Module, x: torch.Tensor, attend: Attend, lin: Linear) -> torch.Tensor:
    """Every decoder layer and the final norm over a step's tokens x [N, hidden], eager or compiled
    (model/compiled.py): `attend(i, q, k, v)` is layer i's attention, `lin(linear, h)` a projection."""
    for i, layer in enumerate(layers):
        attn, mlp = layer.self_attn, layer.mlp
        h = layer.input_layernorm(x)
        x = x + lin(attn.o_proj, attend(i, lin(attn.q_proj, h), lin(attn.k_proj, h), lin(attn.v_proj, h)))
        h = layer.post_attention_layernorm(x)
        x = x + lin(mlp.down_proj, mlp.act_fn(lin(mlp.gate_proj, h)) * lin(mlp.up_proj, h))
    return norm(x)


@dataclass
class DecodeInputs:
    """The running batch's next step: one token per running row, each row in a slot of the cache."""

    ids: torch.Tensor  # [n]
    kv: KV  # [S, kv_heads, capacity, head_dim] per layer
    mask: torch.Tensor  # [S, W+1] bool per slot, the new column included
    positions: torch.Tensor  # [n]
    slots: torch.Tensor | None = None  # [n] the rows' slots, ascending; None: slots 0..n-1
    start: int = 0  # columns before it are used by no row
    # per row, the keys/values its first kept columns were copied from, in order, as (tensor [L, 2, kv_heads, P,
    # head_dim] or None where its cache let it go, columns used) (Sequence.shared); read there by the CPU decode
    # kernel (Runner.reads_pieces)
    pieces: list[list[tuple[torch.Tensor | None, int]]] | None = None


class _Part(ABC):
    """Some of a step's tokens whose attention runs on its own: the running rows, or one newcomer group."""

    x: torch.Tensor  # [t, hidden]
    tokens: int

    @abstractmethod
    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """This part's projected q, k, v [t, *] in layer `layer` -> attention output [t, heads * head_dim]."""

    @abstractmethod
    def finish(self, hidden: torch.Tensor):
        """The part's final hidden states [t, hidden] -> what the runner returns for it."""


class _DecodePart(_Part):
    """One new token per running row, written into column kv.width of the row's slot.

    Attention runs over the slots up to the highest used one and the columns from `start`; where free slots lie
    between used ones, the queries are scattered into slot order and the outputs gathered back (free slots see
    only the new column, so they stay finite; their outputs are dropped).
    """

    def __init__(self, runner: LlamaRunner, inputs: DecodeInputs):
        self.r, self.kv, self.slots, self.start = runner, inputs.kv, inputs.slots, inputs.start
        self.kv.reserve(1)
        self.col = self.kv.width
        self.x = runner.embed_tokens(inputs.ids)  # [n, hidden]
        self.tokens = self.b = self.x.shape[0]
        self.cos, self.sin = runner.rotary(self.x, inputs.positions[:, None])  # [n, 1, d]
        self.span = self.b if self.slots is None else int(self.slots[-1]) + 1
        self.bias = self.mask = None
        if runner.decode_kernel is not None:
            # the kernel reads each row's kept columns from its slot; free slots are not visited
            self.keep = inputs.mask[:, self.start :]
            self.rows = inputs.slots if inputs.slots is not None else torch.arange(self.b)
            self.shared, self.redirect = _redirects(inputs.pieces, inputs.mask, self.rows, self.kv.keys[0],
                                                    len(self.kv.keys))
            return
        mask = inputs.mask[: self.span, self.start :]
        if self.slots is not None:
            mask = mask.clone()
            mask[:, -1] = True
        self.mask = mask[:, None, None, :]  # [span, 1, 1, W+1-start]
        # On the CPU attention is written out (a few rows per KV head: two batched products beat the fused kernel's
        # per-block overhead), with the mask made additive once per step instead of once per layer.
        if self.x.device.type == "cpu":
            self.bias = torch.zeros(self.mask.shape, dtype=self.x.dtype).masked_fill_(~self.mask, float("-inf"))

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        r, b, d = self.r, self.b, self.r.head_dim
        q = q.contiguous().view(b, 1, r.n_heads, d).transpose(1, 2)  # [n, H, 1, d]
        k = k.contiguous().view(b, 1, r.n_kv, d).transpose(1, 2)  # [n, kv, 1, d]
        q, k = r.apply_rotary(q, k, self.cos, self.sin)
        keys, values = self.kv.keys[layer], self.kv.values[layer]
        rows = slice(0, b) if self.slots is None else self.slots
        keys[rows, :, self.col] = k[:, :, 0]
        values[rows, :, self.col] = v.reshape(b, r.n_kv, d)
        # one query per head: fold the heads that share a KV head into the query axis, no KV repeat needed
        qg = q.reshape(b, r.n_kv, r.n_heads // r.n_kv, d)  # [n, kv, g, d]
        if r.decode_kernel is not None:
            out = r.decode_kernel(qg.contiguous(), keys, values, self.rows, self.keep, self.start, r.attn_scale,
                                  self.shared, self.redirect, layer)
            return out.reshape(b, -1)
        if self.slots is not None:
            qg = qg.new_zeros(self.span, *qg.shape[1:]).index_copy_(0, self.slots, qg)
        cols = slice(self.start, self.col + 1)
        keys, values = keys[: self.span, :, cols], values[: self.span, :, cols]
        if self.bias is not None:
            scores = torch.matmul(qg, keys.transpose(-1, -2)).mul_(r.attn_scale).add_(self.bias)  # [span, kv, g, W]
            out = torch.matmul(scores.softmax(-1, dtype=torch.float32).to(qg.dtype), values)
        else:
            out = F.scaled_dot_product_attention(qg, keys, values, attn_mask=self.mask, scale=r.attn_scale)
        # out: [span, kv, g, d]
        if self.slots is not None:
            out = out[self.slots]
        return out.reshape(b, -1)

    def finish(self, hidden: torch.Tensor) -> torch.Tensor:
        self.kv.width += 1
        return hidden  # [n, hidden]


def _redirects(pieces: list[list[tuple[torch.Tensor | None, int]]] | None, mask: torch.Tensor, rows: torch.Tensor,
               like: torch.Tensor, layers: int) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """The decode kernel's shared pieces: (the distinct tensors, [n, 1 + 2K] long per row: the column its first
    redirected piece starts at, then (piece index, columns) for each redirected piece, -1 past its last), or ([], None)
    when no row has any. K is the most pieces any row has redirected.

    `pieces`: per row, (the tensor its first kept columns were copied from, or None where its cache has let it go;
    the columns used), in order (model/batch.py lays them out there, and every later copy keeps the columns in
    order): its adapter's soft prompt or prefix, then the spans of the cached head it stands behind, as many as the
    prefix tree split it into. Only pieces that two or more rows of the step share are read there (the same tensor,
    whatever columns of it each row uses): they stay in cache from one row to the next (30 layers x 32 rows on one
    100-token adapter: 12.5-13.7 instead of 15.9-17.6 ms, scripts/decode_attention_ab.py --shared 100), where a piece
    only one row reads is read as fast from its copy. A row's redirected pieces are its first run of consecutive
    shared ones; the rest it reads from its slot, as it does a piece that does not fit the kernel (not float32 on the
    CPU with [P, head_dim] contiguous, or not `layers` layers of the heads of `like`, a layer's keys [slots,
    kv_heads, C, d]), and all of them where its mask does not keep every column the pieces would stand for."""
    if not pieces or not any(t is not None for row in pieces for t, _ in row):
        return [], None

    def key(t: torch.Tensor) -> tuple:  # the same keys/values, through whichever object holds them
        return t.data_ptr(), t.stride(), t.dtype

    def fits(t: torch.Tensor | None, n: int) -> bool:
        return (t is not None and t.device.type == "cpu" and t.dtype == torch.float32 and t.dim() == 5
                and t.stride(4) == 1 and t.stride(3) == t.shape[4] and t.shape[1] == 2
                and t.shape[0] == layers and t.shape[2] == like.shape[1] and t.shape[4] == like.shape[3]
                and 0 < n <= t.shape[3])

    uses: dict[tuple, int] = {}
    for row in pieces:
        for t, n in row:
            if t is not None:
                uses[key(t)] = uses.get(key(t), 0) + 1
    shared: list[torch.Tensor] = []
    index: dict[tuple, int] = {}
    runs: list[tuple[int, list[int]]] = []  # per row: (offset of its first redirected column, [piece, columns, ...])
    for row in pieces:
        at, offset = 0, 0
        run: list[int] = []
        for t, n in row:  # the row's first run of consecutive shared pieces
            if t is not None and uses[key(t)] >= 2 and fits(t, n):
                if key(t) not in index:
                    index[key(t)] = len(shared)
                    shared.append(t)
                elif t.shape[3] > shared[index[key(t)]].shape[3]:  # two views of one tensor: the longer serves both
                    shared[index[key(t)]] = t
                if not run:
                    offset = at
                run += [index[key(t)], n]
            elif run:
                break
            at += n
        runs.append((offset, run))
    if not shared:
        return [], None
    kept = mask[rows]
    first = kept.to(torch.int8).argmax(1).tolist()  # each row's first kept column
    width = max(len(run) for _, run in runs)
    table = []
    for i, (offset, run) in enumerate(runs):
        a = first[i] + offset
        cols = sum(run[1::2])  # the columns they stand for must all be the row's own
        if run and (a + cols > kept.shape[1] or not bool(kept[i, a : a + cols].all())):
            run = []
        table.append([a, *run] + [-1] * (width - len(run)))
    return shared, torch.tensor(table, dtype=torch.long)


class _PrefillPart(_Part):
    """Newcomer rows laid out as in batch.py; each gets a fresh cache with `spare` free columns."""

    def __init__(self, runner: LlamaRunner, inputs: PrefillInputs, spare: int):
        self.r, self.inputs, self.spare = runner, inputs, spare
        x = embed(inputs, runner.embed_tokens)  # [n, S, hidden]
        self.n, self.s, _ = x.shape
        self.x = x.reshape(self.n * self.s, -1)
        self.tokens = self.n * self.s
        self.pw = inputs.prefix_width
        self.width = self.pw + self.s
        self.cos, self.sin = runner.rotary(x, inputs.positions)  # [n, S, d]
        # mask: [n, 1, S, Pmax+S]; causal over the S columns, each row's holes closed; every query sees itself
        # so that padding rows stay finite (their outputs are never used).
        s, dev = self.s, x.device
        mask = inputs.mask[:, None, None, :].expand(self.n, 1, s, self.width).clone()
        mask[:, :, :, self.pw :] &= torch.ones(s, s, dtype=torch.bool, device=dev).tril()
        mask[:, :, :, self.pw :] |= torch.eye(s, dtype=torch.bool, device=dev)
        self.mask = mask
        self.rows = torch.arange(self.n, device=dev)
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.whole: torch.Tensor | None = None  # every layer's cache, where the runner allocates them at once

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        r, n, s, d, pw = self.r, self.n, self.s, self.r.head_dim, self.pw
        q = q.contiguous().view(n, s, r.n_heads, d).transpose(1, 2)  # [n, H, S, d]
        k = k.contiguous().view(n, s, r.n_kv, d).transpose(1, 2)  # [n, kv, S, d]
        q, k = r.apply_rotary(q, k, self.cos, self.sin)
        # the rows' new cache, their prefixes already in front; the step's columns are written below, and only the
        # spare ones are zeroed (a slot freed later keeps them, and torch's attention must meet no NaN in the columns
        # it masks)
        if r.whole_cache:
            if self.whole is None:
                self.whole = self.inputs.all_layers(len(r.layers), self.width + self.spare, k)
                self.whole[:, :, :n, :, self.width :] = 0
            cache = self.whole[layer]  # [2, slots, kv, columns, d]
        else:
            cache = self.inputs.layer_cache(layer, self.width + self.spare, k, r.place)
            cache[:, :n, :, self.width :] = 0
        self.keys.append(cache[0])
        self.values.append(cache[1])
        kc, vc = cache[0, :n], cache[1, :n]  # the rows' own slots (free slots past them: with_room)
        kc[:, :, pw : self.width] = k
        vc[:, :, pw : self.width] = v.reshape(n, s, r.n_kv, d).transpose(1, 2)
        if s == 1 and r.decode_kernel is not None:
            # one token per row (its prompt's head cached, say): the attention is a decode step's, and the kernel
            # reads only the columns each row's mask keeps
            qg = q.reshape(n, r.n_kv, r.n_heads // r.n_kv, d).contiguous()
            return r.decode_kernel(qg, kc, vc, self.rows, self.inputs.mask, 0, r.attn_scale, [], None,
                                   layer).reshape(n, -1)
        out = F.scaled_dot_product_attention(
            q, kc[:, :, : self.width], vc[:, :, : self.width], attn_mask=self.mask, scale=r.attn_scale,
            enable_gqa=True,
        )  # [n, H, S, d]
        return out.transpose(1, 2).reshape(n * s, -1)

    def finish(self, hidden: torch.Tensor) -> tuple[torch.Tensor, KV]:
        return hidden.view(self.n, self.s, -1), KV(self.keys, self.values, self.width, whole=self.whole)

