"""Soft prompts computed once: the keys and values of a prompt-tuning or P-tuning adapter's virtual tokens.

In a decoder-only model the V virtual tokens sit at positions 0..V-1 and attend only to each other, so every layer's
keys and values over them are the same for every request of one adapter version. They are computed once, with the
model's own forward, and kept like a prefix-tuning adapter's: [L, 2, kv_heads, V, head_dim]. A request then
prefills only its own tokens, at positions V.., with these columns in front. Entries are keyed by adapter id,
version and weights digest, so a replaced adapter is never served from its old keys; the cache is an LRU bounded
in bytes, and pinned adapters are never evicted. Only the engine thread touches it.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

import torch

from prompt_server.adapters.types import SoftPrompt
from prompt_server.model.batch import PrefillRow, build_prefill

Key = tuple[str, int, str]  # adapter id, version, sha256


def key_of(adapter: SoftPrompt) -> Key:
    return adapter.id, adapter.version, adapter.sha256


@dataclass
class PromptKVStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0


class PromptKVCache:
    """LRU of virtual-token keys/values by adapter version, at most `budget_bytes` (pinned ids excepted)."""

    def __init__(self, runner, pad_id: int, device: torch.device, budget_bytes: int, pinned: frozenset[str] = frozenset()):
        self.runner = runner
        self.pad_id = pad_id
        self.device = device
        self.budget_bytes = budget_bytes
        self.pinned = pinned
        self._entries: collections.OrderedDict[Key, torch.Tensor] = collections.OrderedDict()
        self.bytes = 0  # held by the entries; kept as a counter so other threads may read it
        self.stats = PromptKVStats()

    def entries(self) -> list[Key]:
        """Cached entries, least recently used first."""
        return list(self._entries)

    def holds(self, adapter: SoftPrompt) -> bool:
        """Whether the adapter's keys/values are cached (get_many would not compute them)."""
        return key_of(adapter) in self._entries

    def get_many(self, adapters: list[SoftPrompt]) -> dict[Key, torch.Tensor]:
        """Keys/values for every adapter (with virtual tokens), computing the missing ones in one forward."""
        found: dict[Key, torch.Tensor] = {}
        missing: dict[Key, SoftPrompt] = {}
        for a in adapters:
            key = key_of(a)
            if key in found or key in missing:
                continue
            if key in self._entries:
                self._entries.move_to_end(key)
                found[key] = self._entries[key]
                self.stats.hits += 1
            else:
                missing[key] = a
        if missing:
            computed = self._compute(list(missing.values()))
            self.stats.misses += len(computed)
            for key, kv in computed.items():
                found[key] = kv
                self._insert(key, kv)
        return found

    def _compute(self, adapters: list[SoftPrompt]) -> dict[Key, torch.Tensor]:
        """Run the virtual tokens alone at positions 0..V-1; -> per adapter [L, 2, kv_heads, V, head_dim]."""
        rows = [PrefillRow(ids=[], virtual=a.virtual_tokens) for a in adapters]
        inputs = build_prefill(rows, self.pad_id, self.device)
        _, kv = self.runner.prefill(inputs, spare=0)
        out = {}
        for i, a in enumerate(adapters):
            v = a.num_virtual_tokens
            # rows are right-aligned: row i's virtual tokens are the last v of the `kv.width` columns
            keys = torch.stack([k[i, :, kv.width - v : kv.width] for k in kv.keys])  # [L, kv_heads, V, d]
            values = torch.stack([t[i, :, kv.width - v : kv.width] for t in kv.values])
            out[key_of(a)] = torch.stack([keys, values], dim=1).contiguous()  # [L, 2, kv_heads, V, d]
        return out

    def _insert(self, key: Key, kv: torch.Tensor) -> None:
        # Older versions of the same adapter are dead: requests pin the version they were admitted with.
        for old in [k for k in self._entries if k[0] == key[0]]:
            self.bytes -= _nbytes(self._entries.pop(old))
        # room is made before the entry goes in, so `bytes` (read by other threads) never passes the budget; an
        # entry that finds no room (pinned entries fill it) is used for this step and not kept, like an eviction
        need = _nbytes(kv)
        self._evict(need)
        if self.bytes + need > self.budget_bytes and key[0] not in self.pinned:
            self.stats.evictions += 1
            return
        self._entries[key] = kv
        self.bytes += need

    def _evict(self, room: int) -> None:
        """Drop unpinned entries, least recently used first, until `room` more bytes fit in the budget."""
        for key in list(self._entries):
            if self.bytes + room <= self.budget_bytes:
                break
            if key[0] in self.pinned:
                continue
            self.bytes -= _nbytes(self._entries.pop(key))
            self.stats.evictions += 1


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()
