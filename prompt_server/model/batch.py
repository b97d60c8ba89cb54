"""Batch layout for mixed soft prompts: every row right-aligned, prefixes in the past cache, virtual tokens inline.

A prefill of n rows looks like this (P = prefix columns, S = embedding columns):

    cache columns  [ 0 .. Pmax )            inputs_embeds columns [ Pmax .. Pmax+S )
    prefix row     [ 0 0 | k k k ]          [ pad pad | prompt ............ ]
    prompt-tuning  [ 0 0   0 0 0 ]          [ pad | virtual | prompt ...... ]
    plain row      [ 0 0   0 0 0 ]          [ pad pad pad | prompt ........ ]

The attention mask is 1 exactly on each row's own prefix, virtual and prompt columns. Positions: prefix rows start
at P (PEFT uses the prefix raw, without rotary), virtual-token rows at 0, over virtual and real tokens alike.
After the prefill every row's last token sits in the last column, and decoding appends one column a step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import cached_property

import torch

# The native layout (model/native.py): (out, pieces, rows, columns, fill, layer), as PrefillInputs.layer_cache does
Place = Callable[[torch.Tensor, list[torch.Tensor], list[int], list[int], list[int], int], None]


@dataclass
class PrefillRow:
    """One sequence entering the batch."""

    ids: list[int]  # prompt token ids, at least one
    virtual: torch.Tensor | None = None  # [V, hidden]
    prefix: torch.Tensor | None = None  # [L, 2, kv_heads, P, head_dim]
    # a cached head of the prompt, after the prefix: [L, 2, kv_heads, H, head_dim] (causal LMs; engine/prefix_cache.py)
    head: torch.Tensor | None = None

    @property
    def pieces(self) -> list[torch.Tensor]:
        """The keys/values in front of the row's tokens, in order."""
        return [t for t in (self.prefix, self.head) if t is not None]

    @property
    def prefix_len(self) -> int:
        return sum(t.shape[3] for t in self.pieces)

    @property
    def embed_len(self) -> int:
        return len(self.ids) + (0 if self.virtual is None else self.virtual.shape[0])


@dataclass
class PrefillInputs:
    ids: torch.Tensor  # [n, S] token ids, pad where virtual tokens or padding sit
    virtual_mask: torch.Tensor | None  # [n, S] bool, True where a virtual token replaces the embedding
    virtual: torch.Tensor | None  # [sum V, hidden], in row order
    prefixes: list[list[torch.Tensor]]  # per row, the keys/values in front of its tokens (PrefillRow.pieces)
    prefix_lens: list[int]  # per row, their columns (PrefillRow.prefix_len)
    prefix_width: int  # Pmax: the widest row's prefix columns
    mask: torch.Tensor  # [n, Pmax + S] bool
    positions: torch.Tensor  # [n, S] long
    # slots of the rows' new cache: n, or more when rows running now are to join the newcomers' cache after the step
    # (with_room); the slots past n are free
    slots: int = 0

    def with_room(self, slots: int, lead: int) -> PrefillInputs:
        """The same rows with a cache of `slots` slots (at least n) and `lead` more prefix columns, empty, in front
        of every row: room for running rows to join the newcomers' cache instead of the newcomers being copied into
        theirs (engine/engine.py)."""
        n = self.mask.shape[0]
        assert slots >= n and lead >= 0
        mask = torch.cat([self.mask.new_zeros(n, lead), self.mask], dim=1) if lead else self.mask
        return replace(self, mask=mask, prefix_width=self.prefix_width + lead, slots=slots)

    def layer_cache(self, layer: int, columns: int, like: torch.Tensor, place: Place | None = None) -> torch.Tensor:
        """Layer `layer`'s keys and values for the rows, [2, slots, kv_heads, columns, head_dim] with the dtype and
        device of `like` [n, kv_heads, *, head_dim]: each row's prefix right-aligned in the first Pmax columns, the
        columns left of a shorter prefix zeroed (the mask drops them, but attention must not meet NaN there); the
        columns from Pmax on are the caller's to write; free slots past n are zeroed. The pieces are copied straight
        in: no row's prefix is laid out twice. `place`: the native layout (model/native.py), which copies them all
        in one call, where it can take them."""
        n, kv_heads, _, head_dim = like.shape
        out = like.new_empty(2, max(n, self.slots), kv_heads, columns, head_dim)
        if place is not None and out.device.type == "cpu" and self._native_dtypes in (set(), {out.dtype}):
            if self.slots > n:
                out[:, n:] = 0
            place(out, *self._plan, layer)
            return out
        return self._lay_out(out, n, layer)

    def all_layers(self, layers: int, columns: int, like: torch.Tensor) -> torch.Tensor:
        """Every layer's keys and values for the rows at once, [layers, 2, slots, kv_heads, columns, head_dim], laid
        out as layer_cache lays out each layer: each piece is copied once for all its layers, a kernel per piece
        where layer_cache launches one per piece and layer. For a GPU, where a step is bound by launching kernels
        (16 rows behind a soft prompt and a cached head: 960 copies a step become 32); the runner slices each
        layer's from it. Not on the CPU, where one allocation this large would be mapped afresh by the C library
        on every prefill (model/memory.py)."""
        n, kv_heads, _, head_dim = like.shape
        return self._lay_out(like.new_empty(layers, 2, max(n, self.slots), kv_heads, columns, head_dim), n, None)

    def _lay_out(self, out: torch.Tensor, n: int, layer: int | None) -> torch.Tensor:
        """The rows' pieces into `out` [..., slots, kv_heads, columns, head_dim], whose leading axes are (2,) for one
        layer (`layer`: the pieces' layer to copy) or (layers, 2) for all (`layer` None): the free slots past n
        zeroed, each row's columns left of its prefix zeroed, each piece copied where _plan puts it."""
        every = out if layer is None else out[None]  # [layers or 1, 2, slots, kv_heads, columns, head_dim]
        if self.slots > n:
            every[:, :, n:] = 0
        pieces, rows, cols, fill = self._plan
        for i, at in enumerate(fill):
            if at:
                every[:, :, i, :, :at] = 0
        for t, i, at in zip(pieces, rows, cols):
            every[:, :, i, :, at : at + t.shape[3]] = t if layer is None else t[layer]
        return out

    @cached_property
    def _plan(self) -> tuple[list[torch.Tensor], list[int], list[int], list[int]]:
        """Where every piece goes, the same for every layer: (pieces, each one's row, each one's first column, each
        row's columns left of its prefix, to zero)."""
        pieces, rows, cols = [], [], []
        for i, (row, width) in enumerate(zip(self.prefixes, self.prefix_lens)):
            at = self.prefix_width - width
            for t in row:
                pieces.append(t)
                rows.append(i)
                cols.append(at)
                at += t.shape[3]
        return pieces, rows, cols, [self.prefix_width - width for width in self.prefix_lens]

    @cached_property
    def _native_dtypes(self) -> set[torch.dtype] | None:
        """The pieces' dtypes, where the native layout can take every piece (on the CPU, [P, head_dim] blocks
        contiguous); None where it cannot. Checked once per prefill, not per layer."""
        pieces = self._plan[0]
        if not all(t.device.type == "cpu" and t.stride(4) == 1 and t.stride(3) == t.shape[4] for t in pieces):
            return None
        return {t.dtype for t in pieces}

    def past(self) -> list[torch.Tensor] | None:
        """Per layer [2, n, kv_heads, Pmax, head_dim], the rows' prefixes laid out; None when no row has one."""
        if not self.prefix_width:
            return None
        ref = next(t for pieces in self.prefixes for t in pieces)  # [L, 2, kv_heads, P, head_dim]
        like = ref.new_empty(len(self.prefixes), ref.shape[2], 0, ref.shape[4])
        return [self.layer_cache(layer, self.prefix_width, like) for layer in range(ref.shape[0])]


def build_prefill(rows: list[PrefillRow], pad_id: int, device: torch.device) -> PrefillInputs:
    """Lay out rows as in the module docstring."""
    n = len(rows)
    pmax = max(r.prefix_len for r in rows)
    s = max(r.embed_len for r in rows)
    ids = torch.full((n, s), pad_id, dtype=torch.long)
    mask = torch.zeros(n, pmax + s, dtype=torch.bool)
    positions = torch.zeros(n, s, dtype=torch.long)
    has_virtual = any(r.virtual is not None for r in rows)
    virtual_mask = torch.zeros(n, s, dtype=torch.bool) if has_virtual else None
    for i, r in enumerate(rows):
        p, e, t = r.prefix_len, r.embed_len, len(r.ids)
        ids[i, s - t :] = torch.tensor(r.ids, dtype=torch.long)
        mask[i, pmax - p : pmax] = True
        mask[i, pmax + s - e :] = True
        positions[i, s - e :] = torch.arange(p, p + e)
        if r.virtual is not None and virtual_mask is not None:
            virtual_mask[i, s - e : s - t] = True
    virtual = None
    if virtual_mask is not None:
        virtual = torch.cat([r.virtual for r in rows if r.virtual is not None])
        virtual_mask = virtual_mask.to(device)
    return PrefillInputs(
        ids=ids.to(device),
        virtual_mask=virtual_mask,
        virtual=virtual,
        # laid out by the runner, layer by layer, straight into the rows' new cache (PrefillInputs.layer_cache):
        # per layer, so that no allocation is large enough for the C library to map fresh pages for it on every
        # prefill (model/memory.py)
        prefixes=[r.pieces for r in rows],
        prefix_lens=[r.prefix_len for r in rows],
        prefix_width=pmax,
        mask=mask.to(device),
        positions=positions.to(device),
    )


def embed(inputs: PrefillInputs, embed_tokens: torch.nn.Module) -> torch.Tensor:
    """Token embeddings with each row's virtual tokens written over its virtual columns. -> [n, S, hidden]"""
    x = embed_tokens(inputs.ids)
    if inputs.virtual is not None:
        x = x.clone()
        x[inputs.virtual_mask] = inputs.virtual.to(x.dtype)
    return x


class KV:
    """Per-layer keys and values of a running batch, [B, kv_heads, capacity, head_dim]; `width` columns are used.

    Column j holds the same step for every row (rows are right-aligned), so a decode step writes one column for
    all rows at once. Spare capacity lets decoding write in place; engine/batch.py decides which row is in which
    slot.
    """

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], width: int,
                 cross: CrossKV | None = None, whole: torch.Tensor | None = None):
        self.keys = keys
        self.values = values
        self.width = width
        self.cross = cross  # encoder-decoder models: the rows' cross-attention keys/values, slot for slot
        # [L, 2, B, kv_heads, capacity, head_dim] whose [l, 0] and [l, 1] are keys[l] and values[l], where the cache
        # was allocated for all layers at once (PrefillInputs.all_layers): a row's columns of every layer are then
        # one slice of it (engine/admission.py's columns); None otherwise
        self.whole = whole

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0]

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    def reserve(self, columns: int) -> None:
        """Make room for `columns` more columns beyond `width`."""
        need = self.width + columns
        if need <= self.capacity:
            return
        self.keys = [_resized(k, self.width, need) for k in self.keys]
        self.values = [_resized(v, self.width, need) for v in self.values]
        self.whole = None


class CrossKV:
    """An encoder-decoder batch's cross-attention keys/values: per decoder layer [B, heads, E, head_dim], with
    `mask` [B, E] True on each row's encoder columns (left-aligned). Computed once per row, when its encoder runs;
    rows keep the slots they have in the self-attention cache."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], mask: torch.Tensor):
        self.keys = keys
        self.values = values
        self.mask = mask

    @property
    def width(self) -> int:
        return self.mask.shape[1]

    def moved(self, src: torch.Tensor, n_slots: int) -> CrossKV:
        """The rows of slots `src` into slots 0..len(src)-1 of a new cross cache of `n_slots` slots."""
        def move(t: torch.Tensor) -> torch.Tensor:
            out = t.new_zeros(n_slots, *t.shape[1:])
            out[: len(src)] = t[src]
            return out

        return CrossKV([move(k) for k in self.keys], [move(v) for v in self.values], move(self.mask))

    def write(self, slots: torch.Tensor, other: CrossKV, src: torch.Tensor) -> None:
        """Rows `src` of `other` into `slots`; the columns grow (one copy of this cache) when `other` is wider."""
        if other.width > self.width:
            def widen(t: torch.Tensor) -> torch.Tensor:
                out = t.new_zeros(t.shape[0], t.shape[1], other.width, t.shape[3])
                out[:, :, : t.shape[2]] = t
                return out

            self.keys = [widen(k) for k in self.keys]
            self.values = [widen(v) for v in self.values]
            mask = self.mask.new_zeros(self.mask.shape[0], other.width)
            mask[:, : self.mask.shape[1]] = self.mask
            self.mask = mask
        w = other.width
        for dst, part in zip(self.keys + self.values, other.keys + other.values):
            dst[slots, :, :w] = part[src]
        self.mask[slots] = False
        self.mask[slots, :w] = other.mask[src]


def _copy_into(t: torch.Tensor, capacity: int) -> torch.Tensor:
    # t: [B, kv, w, d] -> a fresh [B, kv, capacity, d] holding t in its first w columns
    out = t.new_zeros(t.shape[0], t.shape[1], capacity, t.shape[3])
    out[:, :, : t.shape[2]] = t
    return out


def _resized(t: torch.Tensor, width: int, capacity: int) -> torch.Tensor:
    return _copy_into(t[:, :, :width], capacity)
