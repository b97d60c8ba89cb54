"""Prefix caching keyed by adapter: prompt heads' keys/values, reused by later prompts that start the same way.

A prompt's keys and values depend on everything before them, the adapter's prefix or virtual tokens included, so
cached heads belong to one adapter version (id, version, weights digest), or to "no adapter": equal token ids under
another adapter, another version of it, or none, never share. Each adapter version has a radix tree of token spans,
each node holding its span's keys/values: heads that start the same way (a chat template's system prompt, few-shot
examples) share the nodes of what they have in common, so the common part is held once, whatever the number of
prompts that branch off it. A request takes the longest cached head of its prompt (any length, not only whole
blocks) and prefills only the rest; its last prompt token is always run, since its logits choose the first new
token. Spans are evicted by a segmented LRU within a budget in bytes (`PrefixCache`), leaves only, so every remaining
path stays whole. Only the engine thread touches this.
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


@dataclass(eq=False)  # compared and hashed by identity: nodes are keys of the LRU segments
class Node:
    """A span of tokens under an adapter version, after the tokens of the nodes above it."""

    adapter: AdapterKey
    tokens: list[int]
    kv: torch.Tensor | None  # [L, 2, kv_heads, len(tokens), head_dim]; None at a tree's root (no tokens)
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

# The share of the budget that spans a lookup has reused may hold; beyond it the least recent go back on probation.
PROTECTED_SHARE = 0.8
# Adapter versions whose trees a store compares a new span with (those most recently stored into).
RECENT_TREES = 8


class PrefixCache:
    """Cached prompt heads per adapter version, as radix trees of spans, within `budget_bytes`.

    Eviction is a segmented LRU, which a stream of prompts used once does not flush: a new span is on probation
    until a lookup reuses it, and is then protected. Leaves on probation go first, least recent first (the unique
    tails of prompts seen once), then protected leaves (a chat template's system prompt under each adapter outlives
    them all); protected spans hold at most PROTECTED_SHARE of the budget. A span is never evicted while another
    hangs from it, so every path stays whole.

    A new span whose first tokens the tree of another adapter version also holds from the same position (one of the
    RECENT_TREES last stored into) starts protected, cut where the two part: a head that prompts under several
    adapters begin with (a chat template's system prompt, few-shot examples) is one that this adapter's next prompt
    will begin with too, however many other prompts come in between.
    """

    def __init__(self, budget_bytes: int):
        self.budget_bytes = budget_bytes
        self._roots: dict[AdapterKey, Node] = {}
        self._version: dict[str, AdapterKey] = {}  # an adapter id's one version with a tree
        # spans, least recently used first: on probation, and reused by a lookup since they were stored
        self._probation: collections.OrderedDict[Node, None] = collections.OrderedDict()
        self._protected: collections.OrderedDict[Node, None] = collections.OrderedDict()
        self._protected_bytes = 0
        self._recent: collections.deque[AdapterKey] = collections.deque(maxlen=RECENT_TREES)
        self.bytes = 0  # a counter, so other threads may read it
        self.stats = PrefixStats()

    def entries(self) -> list[Node]:
        """Every cached span in eviction order: on probation, then protected, each least recently used first."""
        return [*self._probation, *self._protected]

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
        for node, _ in reversed(path):  # reused: protected now, deepest first so a parent is the more recent
            if node in self._probation:
                del self._probation[node]
                self._enter(node, protect=True)
            else:
                self._protected.move_to_end(node)
        self._demote({node for node, _ in path})
        self.stats.hits += 1
        self.stats.reused_tokens += n
        return n, [(node.kv, used) for node, used in path]  # type: ignore[misc]  # only roots have no kv

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
        other = self._version.get(adapter[0])
        if other is not None and other != adapter:  # that version is dead: requests pin the one they were admitted with
            self._drop(other)
        root = self._tree(adapter)
        path, n = _walk(root, tokens, len(tokens))
        if n < start:
            self._prune(root)
            return
        if n < len(tokens):
            need = (len(tokens) - n) * kv[:, :, :, :1].numel() * kv.element_size()
            # room first, so that `bytes` (read by other threads) never passes the budget; never at the cost of the
            # spans the new one hangs from
            if need > self.budget_bytes or not self._make_room(need, {node for node, _ in path}):
                self._prune(root)
                return
            self._tree(adapter, root)  # again: making room may have emptied and forgotten this tree
            if path and path[-1][1] < len(path[-1][0].tokens):  # the head leaves this span partway: split it there
                path[-1] = (self._split(*path[-1]), path[-1][1])
            parent = path[-1][0] if path else root
            common = self._common_elsewhere(adapter, tokens)
            for a, b, protect in ((n, common, True), (max(n, common), len(tokens), False)):
                if a >= b:
                    continue
                node = Node(adapter, tokens[a:b], kv[:, :, :, a - start : b - start].contiguous(), parent)
                parent.children[node.tokens[0]] = node
                self._enter(node, protect)
                self.bytes += node.nbytes
                self.stats.stored += 1
                path.append((node, len(node.tokens)))
                parent = node
            if common > n:
                self._demote({node for node, _ in path})
            if adapter in self._recent:
                self._recent.remove(adapter)
            self._recent.append(adapter)
        for node, _ in reversed(path):  # used now, each in its segment; deepest first so a parent is the more recent
            (self._protected if node in self._protected else self._probation).move_to_end(node)

    def _common_elsewhere(self, adapter: AdapterKey, tokens: list[int]) -> int:
        """How many of `tokens`' first tokens the tree of another recently stored adapter version holds (0 if fewer
        than MIN_REUSE_TOKENS): a read, which changes no span's place."""
        most = 0
        for other in self._recent:
            root = self._roots.get(other)
            if other != adapter and root is not None:
                most = max(most, _walk(root, tokens, len(tokens))[1])
        return most if most >= MIN_REUSE_TOKENS else 0

    def _split(self, node: Node, at: int) -> Node:
        """Cut `node`'s span after its first `at` tokens: a new node above it holds those (in `node`'s segment), and
        `node` the rest (on probation: no lookup has reused it alone). Both are copies, so the bytes held stay the
        same; rows that read the old tensor where they were copied from read their copies (model/forward.py)."""
        assert node.parent is not None and node.kv is not None and 0 < at < len(node.tokens)
        upper = Node(node.adapter, node.tokens[:at], node.kv[:, :, :, :at].clone(), node.parent)
        node.parent.children[upper.tokens[0]] = upper
        protected = node in self._protected
        self._forget(node)
        node.tokens, node.kv, node.parent = node.tokens[at:], node.kv[:, :, :, at:].clone(), upper
        upper.children[node.tokens[0]] = node
        self._enter(node, protect=False)
        self._enter(upper, protected)
        self.bytes += upper.nbytes + node.nbytes
        return upper

    def _demote(self, keep: set[Node]) -> None:
        """Protected spans past their share go back on probation (most recent there), least recent first."""
        limit = PROTECTED_SHARE * self.budget_bytes
        if self._protected_bytes <= limit:
            return
        for node in list(self._protected):
            if self._protected_bytes <= limit:
                break
            if node not in keep:
                del self._protected[node]
                self._protected_bytes -= node.nbytes
                self._enter(node, protect=False)

    def _make_room(self, need: int, keep: set[Node]) -> bool:
        """Evict leaves, those on probation first, each segment least recently used first, until `need` more bytes
        fit; never one in `keep`. -> whether they fit."""
        while self.bytes + need > self.budget_bytes:
            victim = next((n for segment in (self._probation, self._protected) for n in segment
                           if not n.children and n not in keep), None)
            if victim is None:
                return False
            self._remove(victim)
            self.stats.evictions += 1
        return True

    def _enter(self, node: Node, protect: bool) -> None:
        """Put a span that is in neither segment into one, as its most recent."""
        if protect:
            self._protected[node] = None
            self._protected_bytes += node.nbytes
        else:
            self._probation[node] = None

    def _forget(self, node: Node) -> None:
        """Take a span out of its segment and out of `bytes`."""
        if node in self._protected:
            del self._protected[node]
            self._protected_bytes -= node.nbytes
        else:
            del self._probation[node]
        self.bytes -= node.nbytes

    def _remove(self, leaf: Node) -> None:
        assert leaf.parent is not None and not leaf.children
        del leaf.parent.children[leaf.tokens[0]]
        self._forget(leaf)
        self._prune(leaf.parent)

    def _tree(self, adapter: AdapterKey, root: Node | None = None) -> Node:
        """`adapter`'s tree (`root`, or a new one, when it has none)."""
        if adapter not in self._roots:
            self._roots[adapter] = root or Node(adapter, [], None)
            self._version[adapter[0]] = adapter
        return self._roots[adapter]

    def _prune(self, node: Node) -> None:
        """Forget an adapter's tree once its root has nothing below it."""
        if node.parent is None and not node.children and self._roots.pop(node.adapter, None) is not None:
            del self._version[node.adapter[0]]

    def _drop(self, adapter: AdapterKey) -> None:
        """Every span of one adapter version."""
        del self._version[adapter[0]]
        stack = [self._roots.pop(adapter)]
        while stack:
            node = stack.pop()
            stack.extend(node.children.values())
            if node.kv is not None:
                self._forget(node)
            # a tree is a web of cycles (parent <-> children): unlinked, its keys/values are freed now, not at the
            # collector's next full pass, which may come only after many more versions' trees have been dropped
            node.kv, node.parent, node.children = None, None, {}


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
