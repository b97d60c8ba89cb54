"""Prefix caching keyed by adapter: prompt heads' keys/values, reused by later prompts that start the same way.

A prompt's keys and values depend on everything before them, the adapter's prefix or virtual tokens included, so
cached heads belong to one adapter version (id, version, weights digest), or to "no adapter": equal token ids under
another adapter, another version of it, or none, never share. Each adapter version has a radix tree of token spans,
each node holding its span's keys/values: heads that start the same way (a chat template's system prompt, few-shot
examples) share the nodes of what they have in common, so the common part is held once, whatever the number of
prompts that branch off it (a split span keeps its tensor and copies only the part below the split, so that running
rows that read it there still can). A request takes the longest cached head of its prompt (any length, not only whole
blocks) and prefills only the rest; its last prompt token is always run, since its logits choose the first new
token. Nodes are an LRU bounded in bytes in which a node is always more recent than the nodes below it, so the least
recent is a leaf and evicting it leaves every remaining path whole. Only the engine thread touches this.
"""

from __future__ import annotations

import collections
import os
from dataclasses import dataclass, field

import torch

AdapterKey = tuple[str, int, str]  # adapter id, version, sha256; ("", 0, "") for no adapter
NO_ADAPTER: AdapterKey = ("", 0, "")
# Shorter shared heads are not worth the copy into the row's cache.
MIN_REUSE_TOKENS = 4


@dataclass(eq=False)  # compared and hashed by identity: nodes are keys of the LRU
class Node:
    """A span of tokens under an adapter version, after the tokens of the nodes above it."""

    adapter: AdapterKey
    tokens: list[int]
    # [L, 2, kv_heads, C, head_dim], its first len(tokens) columns this span's; None at a tree's root (no tokens).
    # C > len(tokens) after a split (`PrefixCache._split`): the upper part keeps the tensor rows were copied from.
    kv: torch.Tensor | None
    parent: Node | None = None
    children: dict[int, Node] = field(default_factory=dict)  # by their first token

    @property
    def nbytes(self) -> int:
        return 0 if self.kv is None else self.kv.numel() * self.kv.element_size()

    @property
    def start(self) -> int:
        """Tokens before this span."""
        n, node = 0, self.parent
        while node is not None:
            n += len(node.tokens)
            node = node.parent
        return n


@dataclass
class PrefixStats:
    hits: int = 0  # rows that reused a head
    reused_tokens: int = 0  # prompt tokens not prefilled thanks to it
    stored: int = 0  # spans added
    evictions: int = 0  # spans evicted to make room


Path = list[tuple[Node, int]]  # nodes from the root down, with the tokens of each that a prompt matches


class PrefixCache:
    """Cached prompt heads per adapter version, as radix trees of spans, LRU within `budget_bytes`."""

    def __init__(self, budget_bytes: int):
        self.budget_bytes = budget_bytes
        self._roots: dict[AdapterKey, Node] = {}
        self._lru: collections.OrderedDict[Node, None] = collections.OrderedDict()  # spans, least recent first
        self.bytes = 0  # a counter, so other threads may read it
        self.stats = PrefixStats()

    def entries(self) -> list[Node]:
        """Every cached span, least recently used first."""
        return list(self._lru)

    def lookup(self, adapter: AdapterKey, prompt: list[int]) -> tuple[int, torch.Tensor | None]:
        """The longest cached head of `prompt` under `adapter` (leaving at least its last token to run).

        -> (tokens reused, their keys/values [L, 2, kv_heads, n, head_dim]) or (0, None).
        """
        n, pieces = self.lookup_pieces(adapter, prompt)
        return (n, join(pieces)) if pieces else (0, None)

    def lookup_pieces(self, adapter: AdapterKey, prompt: list[int]) -> tuple[int, list[tuple[torch.Tensor, int]]]:
        """lookup's answer as (tokens reused, [(a span's keys/values, its first columns that are used)] in order), or
        (0, []). The spans are the cache's own tensors: a caller copies what it uses."""
        root = self._roots.get(adapter)
        if root is None or len(prompt) < 2:
            return 0, []
        path, n = _walk(root, prompt, len(prompt) - 1)
        if n < MIN_REUSE_TOKENS:
            return 0, []
        self._touch([node for node, _ in path])
        self.stats.hits += 1
        self.stats.reused_tokens += n
        return n, [(node.kv, used) for node, used in path if node.kv is not None]

    def cached_length(self, adapter: AdapterKey, tokens: list[int]) -> int:
        """How many of `tokens`' first tokens are cached under `adapter` (a store from there on adds the rest)."""
        root = self._roots.get(adapter)
        return 0 if root is None else _walk(root, tokens, len(tokens))[1]

    def store(self, adapter: AdapterKey, tokens: list[int], kv: torch.Tensor, start: int = 0) -> None:
        """Keep `tokens`' keys/values under `adapter`. `kv` [L, 2, kv_heads, len(tokens) - start, head_dim] covers
        tokens[start:]; the first `start` must be cached already (cached_length), else nothing is stored."""
        assert kv.shape[3] == len(tokens) - start
        if not tokens:
            return
        if adapter[0]:  # another version of the same adapter is dead: requests pin the version they were admitted with
            for other in [k for k in self._roots if k[0] == adapter[0] and k != adapter]:
                self._drop(other)
        root = self._roots.setdefault(adapter, Node(adapter, [], None))
        path, n = _walk(root, tokens, len(tokens))
        if n < start:
            self._prune(root)
            return
        if n < len(tokens):
            per_token = kv[:, :, :, :1].numel() * kv.element_size()
            # the head leaves the last span partway: it is split there, which copies the span's rest (_split)
            cut = path[-1] if path and path[-1][1] < len(path[-1][0].tokens) else None
            need = (len(tokens) - n + (len(cut[0].tokens) - cut[1] if cut else 0)) * per_token
            # room first, so that `bytes` (read by other threads) never passes the budget; never at the cost of the
            # spans the new one hangs from
            if need > self.budget_bytes or not self._make_room(need, {node for node, _ in path}):
                self._prune(root)
                return
            self._roots[adapter] = root  # again: making room may have emptied and forgotten this tree
            if cut is not None:
                path[-1] = (self._split(*cut), cut[1])
            parent = path[-1][0] if path else root
            leaf = Node(adapter, tokens[n:], kv[:, :, :, n - start :].contiguous(), parent)
            parent.children[leaf.tokens[0]] = leaf
            self._lru[leaf] = None
            self.bytes += leaf.nbytes
            self.stats.stored += 1
            path.append((leaf, len(leaf.tokens)))
        self._touch([node for node, _ in path])

    def _split(self, node: Node, at: int) -> Node:
        """Cut `node`'s span after its first `at` tokens: a new node above it holds those, and keeps the tensor
        (running rows may read it where their columns were copied from, model/forward.py _redirects); `node` keeps
        the rest, copied. The copy is counted in `bytes` (the caller made room for it)."""
        assert node.parent is not None and node.kv is not None and 0 < at < len(node.tokens)
        upper = Node(node.adapter, node.tokens[:at], node.kv, node.parent)
        node.parent.children[upper.tokens[0]] = upper
        rest = node.kv[:, :, :, at : len(node.tokens)].clone()
        node.tokens, node.kv, node.parent = node.tokens[at:], rest, upper
        upper.children[node.tokens[0]] = node
        self._lru[upper] = None
        self.bytes += node.nbytes  # `upper` took over what `node` counted
        self._touch([upper, node])  # the two are used now; `upper` after `node`, as a parent is
        return upper

    def _touch(self, path: list[Node]) -> None:
        """Mark a root-to-node path used, deepest first, so that every node stays more recent than those below it."""
        for node in reversed(path):
            if node in self._lru:
                self._lru.move_to_end(node)

    def _make_room(self, need: int, keep: set[Node]) -> bool:
        """Evict spans, least recently used first (always leaves: a parent is more recent than its children), until
        `need` more bytes fit; never one in `keep`. -> whether they fit."""
        while self.bytes + need > self.budget_bytes:
            victim = next((n for n in self._lru if not n.children and n not in keep), None)
            if victim is None:
                return False
            self._remove(victim)
            self.stats.evictions += 1
        return True

    def _remove(self, leaf: Node) -> None:
        assert leaf.parent is not None and not leaf.children
        del leaf.parent.children[leaf.tokens[0]]
        del self._lru[leaf]
        self.bytes -= leaf.nbytes
        self._prune(leaf.parent)

    def _prune(self, node: Node) -> None:
        """Forget an adapter's tree once its root has nothing below it."""
        if node.parent is None and not node.children:
            self._roots.pop(node.adapter, None)

    def _drop(self, adapter: AdapterKey) -> None:
        """Every span of one adapter version."""
        stack = [self._roots.pop(adapter)]
        while stack:
            node = stack.pop()
            stack.extend(node.children.values())
            if node in self._lru:
                del self._lru[node]
                self.bytes -= node.nbytes


def _walk(root: Node, tokens: list[int], limit: int) -> tuple[Path, int]:
    """The nodes below `root` that tokens[:limit] runs through, the last one perhaps partway; -> (path, tokens)."""
    path: Path = []
    n, node = 0, root
    while n < limit:
        child = node.children.get(tokens[n])
        if child is None:
            break
        used = len(os.path.commonprefix([child.tokens, tokens[n:limit]]))
        path.append((child, used))
        n += used
        if used < len(child.tokens):
            break
        node = child
    return path, n


def join(pieces: list[tuple[torch.Tensor, int]]) -> torch.Tensor:
    """The head that lookup_pieces' pieces make: [L, 2, kv_heads, n, head_dim] (a view when there is one piece)."""
    if len(pieces) == 1:
        t, n = pieces[0]
        return t[:, :, :, :n]
    return torch.cat([t[:, :, :, :n] for t, n in pieces], dim=3)
