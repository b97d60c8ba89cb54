"""Prefix caching keyed by adapter: a prompt head's keys/values, reused by later prompts that start the same way.

A prompt's keys and values depend on everything before them, the adapter's prefix or virtual tokens included, so
an entry belongs to one adapter version (id, version, weights digest), or to "no adapter": equal token ids under
another adapter, another version of it, or none, never share. A request whose prompt starts with a cached entry's
tokens (any length, not only whole blocks) takes the longest such head from it and prefills only the rest; its
last prompt token is always run, since its logits choose the first new token. Entries are an LRU bounded in
bytes. Only the engine thread touches this.
"""

from __future__ import annotations

import collections
import itertools
import os
from dataclasses import dataclass

import torch

AdapterKey = tuple[str, int, str]  # adapter id, version, sha256; ("", 0, "") for no adapter
NO_ADAPTER: AdapterKey = ("", 0, "")
# Shorter shared heads are not worth the copy into the row's cache.
MIN_REUSE_TOKENS = 4


@dataclass
class Entry:
    adapter: AdapterKey
    tokens: list[int]  # the head's token ids
    kv: torch.Tensor  # [L, 2, kv_heads, len(tokens), head_dim]

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()


@dataclass
class PrefixStats:
    hits: int = 0  # rows that reused a head
    reused_tokens: int = 0  # prompt tokens not prefilled thanks to it
    stored: int = 0
    evictions: int = 0


class PrefixCache:
    """Cached prompt heads per adapter version, LRU within `budget_bytes`."""

    def __init__(self, budget_bytes: int):
        self.budget_bytes = budget_bytes
        self._entries: collections.OrderedDict[int, Entry] = collections.OrderedDict()
        self._index: dict[tuple[AdapterKey, int], set[int]] = {}  # (adapter, first token) -> entry ids
        self._ids = itertools.count()
        self.bytes = 0  # a counter, so other threads may read it
        self.stats = PrefixStats()

    def entries(self) -> list[Entry]:
        """Least recently used first."""
        return list(self._entries.values())

    def lookup(self, adapter: AdapterKey, prompt: list[int]) -> tuple[int, torch.Tensor | None]:
        """The longest cached head of `prompt` under `adapter` (leaving at least its last token to run).

        -> (tokens reused, their keys/values [L, 2, kv_heads, n, head_dim]) or (0, None).
        """
        n, entry = self.lookup_entry(adapter, prompt)
        return (n, entry.kv[:, :, :, :n]) if entry is not None else (0, None)

    def lookup_entry(self, adapter: AdapterKey, prompt: list[int]) -> tuple[int, Entry | None]:
        """lookup's answer as (tokens reused, the entry whose first ones they are) or (0, None)."""
        limit = len(prompt) - 1
        best, best_id = 0, None
        for entry_id in self._index.get((adapter, prompt[0]), ()):
            entry = self._entries[entry_id]
            n = min(len(os.path.commonprefix([entry.tokens, prompt])), limit)
            if n > best:
                best, best_id = n, entry_id
        if best < MIN_REUSE_TOKENS or best_id is None:
            return 0, None
        self._entries.move_to_end(best_id)
        self.stats.hits += 1
        self.stats.reused_tokens += best
        return best, self._entries[best_id]

    def store(self, adapter: AdapterKey, tokens: list[int], kv: torch.Tensor) -> None:
        """Keep `tokens`' keys/values [L, 2, kv_heads, len(tokens), head_dim] under `adapter`."""
        assert kv.shape[3] == len(tokens)
        entry = Entry(adapter, list(tokens), kv)
        if not tokens or entry.nbytes > self.budget_bytes:
            return
        for entry_id, old in list(self._entries.items()):
            # another version of the same adapter is dead (requests pin the version they were admitted with), and
            # an entry this one extends is redundant: every lookup it answers, this one answers as well
            stale = adapter[0] and old.adapter[0] == adapter[0] and old.adapter != adapter
            extended = old.adapter == adapter and old.tokens == tokens[: len(old.tokens)]
            if stale or extended:
                self._remove(entry_id)
        # room first, so that `bytes` (read by other threads) never passes the budget
        while self.bytes + entry.nbytes > self.budget_bytes:
            self._remove(next(iter(self._entries)))
            self.stats.evictions += 1
        entry_id = next(self._ids)
        self._entries[entry_id] = entry
        self._index.setdefault((adapter, tokens[0]), set()).add(entry_id)
        self.bytes += entry.nbytes
        self.stats.stored += 1

    def _remove(self, entry_id: int) -> None:
        entry = self._entries.pop(entry_id)
        ids = self._index[(entry.adapter, entry.tokens[0])]
        ids.discard(entry_id)
        if not ids:
            del self._index[(entry.adapter, entry.tokens[0])]
        self.bytes -= entry.nbytes
