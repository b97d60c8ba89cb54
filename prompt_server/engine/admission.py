"""How newcomers and prompt chunks are laid out for a step, and what a finished prefill leaves for later ones.

In front of a row's tokens stand, as keys/values: its adapter's prefix, or its virtual tokens' cached keys/values
(prompt_kv.py); then a cached head of its prompt (prefix_cache.py) or the chunks it prefilled in earlier steps.
After the step, finished prompts leave their heads in the prefix cache.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from prompt_server.adapters.types import SoftPrompt
from prompt_server.engine.batch import spare_for
from prompt_server.engine.prefix_cache import MIN_REUSE_TOKENS, NO_ADAPTER, PrefixCache, join
from prompt_server.engine.prompt_kv import PromptKVCache, key_of
from prompt_server.engine.sequence import Sequence
from prompt_server.model.batch import PrefillInputs, PrefillRow, build_prefill


@dataclass
class Prepared:
    """A group of rows laid out for this step's prefill."""

    seqs: list[Sequence]
    rows: list[PrefillRow]
    starts: list[int]  # prompt tokens each row has in front of this step's (a cached head, earlier chunks)
    inputs: PrefillInputs
    spare: int  # free cache columns to leave after the prompt


class Layout:
    """Soft prompts, cached heads and chunks in front of each row's tokens."""

    def __init__(self, prompt_kv: PromptKVCache | None, prefix_cache: PrefixCache | None, pad_id: int,
                 device: torch.device, build=build_prefill, keep_pieces: bool = False):
        self.prompt_kv = prompt_kv
        self.prefix_cache = prefix_cache
        self.pad_id = pad_id
        self.device = device
        self.build = build  # the runner's layout of newcomer rows (model/batch.py's, or an encoder-decoder's)
        self.keep_pieces = keep_pieces  # Sequence.shared, for a runner that reads them (Runner.reads_pieces)

    def soft(self, adapters: list[SoftPrompt | None]) -> list[tuple[torch.Tensor | None, torch.Tensor | None]]:
        """(virtual tokens, prefix keys/values) per row; virtual tokens become their cached keys/values when the
        soft-prompt cache is on, so a row prefills only its own tokens."""
        cached = {}
        if self.prompt_kv is not None:
            cached = self.prompt_kv.get_many([a for a in adapters if a is not None and a.virtual_tokens is not None])
        out: list[tuple[torch.Tensor | None, torch.Tensor | None]] = []
        for a in adapters:
            if a is None:
                out.append((None, None))
            elif a.prefix is not None:
                out.append((None, a.prefix))
            elif cached:
                out.append((None, cached[key_of(a)]))
            else:
                out.append((a.virtual_tokens, None))
        return out

    def prepare(self, seqs: list[Sequence]) -> Prepared:
        """Lay out a group for this step: soft prompts as keys/values, cached prompt heads or the chunks prefilled
        so far in front, then each row's next chunk of prompt."""
        rows, starts = [], []
        soft = iter(self.soft([s.adapter for s in seqs if s.partial is None]))
        prefix: torch.Tensor | None
        for s in seqs:
            head = None
            if s.partial is not None:  # a later chunk: everything before it is keys/values already
                virtual, prefix, start = None, s.partial, s.prefilled
            else:
                virtual, prefix = next(soft)
                start = 0
                # what the row's first columns will be copies of, for a runner that reads them there
                held: list[tuple[weakref.ref, int]] = []
                if prefix is not None:
                    held.append((weakref.ref(prefix), prefix.shape[3]))
                # a cached head stands in front of the prompt as keys/values, after the soft prompt (not when every
                # prompt token's logprob is asked for, nor behind virtual tokens run inline)
                if self.prefix_cache is not None and virtual is None and not s.request.prefill_logprobs:
                    start, pieces = self.prefix_cache.lookup_pieces(adapter_key(s.adapter), s.prompt_ids)
                    if pieces:
                        head = join(pieces)
                        held += [(weakref.ref(t), n) for t, n in pieces]
                if self.keep_pieces:
                    s.shared = held  # the decode kernel reads the ones other rows share where they came from
            end = min(len(s.prompt_ids), start + max(s.chunk, 1))
            rows.append(PrefillRow(ids=s.prompt_ids[start:end], virtual=virtual, prefix=prefix, head=head))
            starts.append(start)
        return Prepared(seqs, rows, starts, self.build(rows, self.pad_id, self.device), spare_for(seqs))

    def keep_partial(self, group: Prepared, i: int, kv) -> torch.Tensor:
        """Row i's keys/values so far, for its next chunk: the prefix region's last columns (soft prompt, head,
        earlier chunks), then this step's chunk."""
        row, pmax, width = group.rows[i], group.inputs.prefix_width, kv.width
        return columns(kv, i, [(pmax - row.prefix_len, pmax), (width - len(row.ids), width)])

    def store_heads(self, group: Prepared, kv, done: list[int]) -> None:
        """Keep each finished prompt's head (all but its last token) for later prompts that start the same way: the
        part the cache does not hold yet."""
        if self.prefix_cache is None:
            return
        pmax, width = group.inputs.prefix_width, kv.width
        for i in done:
            s, row, n = group.seqs[i], group.rows[i], group.starts[i]
            head = len(s.prompt_ids) - 1
            if row.virtual is not None or head < MIN_REUSE_TOKENS:
                continue
            key, tokens = adapter_key(s.adapter), s.prompt_ids[:head]
            have = self.prefix_cache.cached_length(key, tokens)
            if have >= head:
                continue
            # row i's columns: the n prompt tokens before this step end the prefix region, its tokens end the batch;
            # the first `have` of them are cached already
            tail = len(row.ids)
            spans = _skip([(pmax - n, pmax), (width - tail, width - tail + head - n)], have)
            self.prefix_cache.store(key, tokens, columns(kv, i, spans), start=have)


def _skip(spans: list[tuple[int, int]], k: int) -> list[tuple[int, int]]:
    """The column spans [a, b) without their first k columns in all."""
    out = []
    for a, b in spans:
        drop = max(0, min(k, b - a))
        k -= drop
        if a + drop < b:
            out.append((a + drop, b))
    return out


def columns(kv, row: int, spans: list[tuple[int, int]]) -> torch.Tensor:
    """Row `row`'s keys/values at the cache columns of `spans` ([a, b) each, in order) -> [L, 2, kv_heads, columns,
    head_dim]: slices, copied once; from a cache allocated for all layers at once (KV.whole), one slice per span for
    every layer (on a GPU a kernel per span, not one per span and layer)."""
    spans = [(a, b) for a, b in spans if b > a]
    assert spans, "no columns to keep"  # callers keep at least one: a head not cached yet, a chunk's tokens
    if kv.whole is not None:
        parts = [kv.whole[:, :, row, :, a:b] for a, b in spans]
        return torch.cat(parts, dim=3) if len(parts) > 1 else parts[0].clone(memory_format=torch.contiguous_format)
    keys = torch.stack([torch.cat([k[row, :, a:b] for a, b in spans], dim=1) for k in kv.keys])  # [L, kv, n, d]
    values = torch.stack([torch.cat([v[row, :, a:b] for a, b in spans], dim=1) for v in kv.values])
    return torch.stack([keys, values], dim=1)


def adapter_key(adapter: SoftPrompt | None):
    return NO_ADAPTER if adapter is None else key_of(adapter)
