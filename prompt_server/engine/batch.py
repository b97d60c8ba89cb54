"""The running batch: rows in slots of one cache, freed and filled without copying the others."""

from __future__ import annotations

import torch

from prompt_server.engine.sequence import Sequence
from prompt_server.model.batch import KV, PrefillRow

# Free cache columns kept ahead of the rows so decoding writes in place; bounded to cap the memory a batch holds.
MAX_SPARE = 256
# Padded tokens one prefill may run at once; newcomers beyond it wait for the next step.
MAX_PREFILL_TOKENS = 8192


def spare_for(rows: list[Sequence]) -> int:
    return min(MAX_SPARE, max((r.remaining for r in rows), default=1))


def grown_slots(rows: int, slots: int, columns: int, max_rows: int, max_tokens: int) -> int:
    """Slots for a cache that must hold `rows` rows and has `slots`: doubled, up to `max_rows` and to what
    `max_tokens` cache columns in all allow at `columns` per slot (never fewer than the rows need: the scheduler
    admitted them within that budget)."""
    return max(rows, min(2 * slots, max_rows, max_tokens // columns))


class RunningBatch:
    """The running rows, each in a slot (a row index) of one cache that outlives them.

    Rows are right-aligned on a shared last column (`kv.width`): a decode step writes one column for every row. A
    row keeps its slot from admission to its end; a finished row only frees its slot, and newcomers are written
    into free slots, right-aligned to the same column. Nothing of the running rows is copied when rows join or
    leave; the cache is laid out again (one copy) only when its capacity changes: more rows than slots, a newcomer
    wider than the columns left of the shared one, or the columns run out (then the columns no row uses any more
    are dropped); and when free slots make up half the slots up to the highest used one (the rows move to the
    lowest slots, so attention runs over used slots only; the number of slots stays).

    Per slot: `rows` (None when free), `mask` [S, W] (True where the row has a real column; all False when free),
    `positions` [S] and `next_ids` [S]. Columns before `start` are used by no row: attention skips them. An
    encoder-decoder batch also holds its rows' cross-attention keys/values (`kv.cross`), slot for slot; they move
    with the rows and are written once, when a row joins.
    """

    def __init__(self, rows: list[Sequence | None], kv: KV, mask: torch.Tensor, positions: torch.Tensor,
                 next_ids: torch.Tensor):
        self.rows = rows
        self.kv = kv
        self.mask = mask
        self.positions = positions
        self.next_ids = next_ids
        self.relayouts = 0  # copies of the whole cache, for the metrics
        self._changed()

    def _changed(self) -> None:
        self.alive = [i for i, r in enumerate(self.rows) if r is not None]
        self._slots = torch.tensor(self.alive, dtype=torch.long, device=self.mask.device)
        used = self.mask[self._slots].any(dim=0).nonzero() if self.alive else None
        self.start = int(used[0]) if used is not None and len(used) else 0

    def __len__(self) -> int:
        return len(self.alive)

    @property
    def slots(self) -> torch.Tensor:
        """The used slots, ascending [n] long: the order of every per-row tensor the engine sees."""
        return self._slots

    @property
    def dense(self) -> bool:
        """Rows fill slots 0..n-1: per-row tensors are plain views of the slot tensors."""
        return not self.alive or self.alive[-1] == len(self.alive) - 1

    def sequences(self) -> list[Sequence]:
        return [r for r in (self.rows[i] for i in self.alive) if r is not None]  # alive slots hold a row

    def filter(self, keep: list[int]) -> RunningBatch | None:
        """Keep the rows at positions `keep` of `sequences()`; the others' slots are freed, nothing is copied
        (unless free slots make up half the span up to the highest used one: then the rows move down)."""
        if not keep:
            return None
        if len(keep) == len(self.alive):
            return self
        kept = set(keep)
        gone = [slot for i, slot in enumerate(self.alive) if i not in kept]
        for slot in gone:
            self.rows[slot] = None
        self.mask[torch.tensor(gone, device=self.mask.device)] = False
        self._changed()
        span = self.alive[-1] + 1
        if span >= 8 and 2 * len(self.alive) <= span:
            self._relayout(len(self.rows), self.kv.width - self.start, spare_for(self.sequences()))
        return self

    def admit(self, new: RunningBatch, max_rows: int, max_tokens: int) -> RunningBatch:
        """Write `new`'s rows into free slots, right-aligned to the shared column; -> self.

        When the slots must grow they double, up to `max_rows` and to what `max_tokens` cache columns in all
        allow (never fewer than the rows need: the scheduler admitted them within that budget)."""
        n = len(new)
        if n == 0:
            return self
        self.make_room([new], max_rows, max_tokens)
        free = [i for i, r in enumerate(self.rows) if r is None]
        slots = torch.tensor(free[:n], dtype=torch.long, device=self.mask.device)
        w, col = new.kv.width - new.start, self.kv.width
        src = new.slots
        for dst_t, src_t in zip(self.kv.keys + self.kv.values, new.kv.keys + new.kv.values):
            # index_copy_ writes the rows straight into their slots, where an indexed assignment gathers them into
            # a temporary first: 2.2x faster for 16 rows of 140 columns (30 layers of the default model, 31 ->
            # 14 ms on an AVX2 EPYC); a prefill's rows fill its first slots, so they are a view, not a gather
            part = src_t[:n, :, new.start : new.kv.width] if new.dense else src_t[src, :, new.start : new.kv.width]
            dst_t[:, :, col - w : col].index_copy_(0, slots, part)
        if self.kv.cross is not None and new.kv.cross is not None:
            self.kv.cross.write(slots, new.kv.cross, src)
        self.mask[slots] = False
        self.mask[slots, col - w : col] = new.mask[src, new.start : new.kv.width]
        self.positions[slots] = new.positions[src]
        self.next_ids[slots] = new.next_ids[src]
        for slot, seq in zip(free[:n], new.sequences()):
            self.rows[slot] = seq
        self._changed()
        return self

    def make_room(self, parts: list[RunningBatch], max_rows: int, max_tokens: int) -> None:
        """Room for every row of `parts` at once (the newcomer groups of one step, which admit would otherwise make
        room for one at a time): free slots for them all and columns for the widest, laid out at most once."""
        n = sum(len(p) for p in parts)
        if len(self.rows) - len(self) >= n and all(p.kv.width - p.start <= self.kv.width for p in parts):
            return
        width = max([self.kv.width - self.start] + [p.kv.width - p.start for p in parts])
        spare = spare_for(self.sequences() + [s for p in parts for s in p.sequences()])
        self._relayout(grown_slots(len(self.alive) + n, len(self.rows), width + spare, max_rows, max_tokens), width,
                       spare)

    def join(self, part: RunningBatch, max_rows: int, max_tokens: int) -> RunningBatch:
        """The batch holding this one's rows and `part`'s: `part` written into this one's free slots (admit), or,
        when this one has no room for it and `part` has room for this one (a prefill given room,
        PrefillInputs.with_room), this one's rows written into `part`'s, which copies the fewer columns and lays no
        cache out again."""
        fits_self = len(self.rows) - len(self) >= len(part) and part.kv.width - part.start <= self.kv.width
        fits_part = len(part.rows) - len(part) >= len(self) and self.kv.width - self.start <= part.kv.width
        if fits_part and not fits_self and part.kv.cross is None:
            part.relayouts += self.relayouts
            return part.admit(self, max_rows, max_tokens)
        return self.admit(part, max_rows, max_tokens)

    def reserve(self, columns: int) -> None:
        """Room for `columns` more columns right of the shared one; a full cache is laid out again without the
        columns no row uses."""
        if self.kv.width + columns > self.kv.capacity:
            self._relayout(len(self.rows), self.kv.width - self.start, max(columns, spare_for(self.sequences())))

    def _relayout(self, n_slots: int, width: int, spare: int) -> None:
        """One copy: the rows into slots 0..n-1 of a cache of `n_slots` slots, their last `width` columns
        right-aligned in `width + spare` columns."""
        n = len(self.alive)
        assert n <= n_slots and width >= self.kv.width - self.start
        old_cols = slice(self.start, self.kv.width)
        new_cols = slice(width - (self.kv.width - self.start), width)
        src = self.slots

        def moved(t: torch.Tensor) -> torch.Tensor:
            out = t.new_zeros(n_slots, t.shape[1], width + spare, t.shape[3])
            out[:n, :, new_cols] = t[src, :, old_cols]
            return out

        cross = None if self.kv.cross is None else self.kv.cross.moved(src, n_slots)
        self.kv = KV([moved(k) for k in self.kv.keys], [moved(v) for v in self.kv.values], width, cross)
        mask = self.mask.new_zeros(n_slots, width)
        mask[:n, new_cols] = self.mask[src, old_cols]
        self.mask = mask
        self.positions = _slotted(self.positions, src, n_slots)
        self.next_ids = _slotted(self.next_ids, src, n_slots)
        self.rows = [self.rows[i] for i in self.alive] + [None] * (n_slots - n)
        self.relayouts += 1
        self._changed()


def _slotted(t: torch.Tensor, src: torch.Tensor, n_slots: int) -> torch.Tensor:
    out = t.new_zeros(n_slots)
    out[: len(src)] = t[src]
    return out


def prefill_chunks(rows: list[PrefillRow]) -> list[list[PrefillRow]]:
    """Consecutive runs of rows whose padded size stays within MAX_PREFILL_TOKENS (a single row always fits)."""
    chunks: list[list[PrefillRow]] = []
    longest = 0
    for r in rows:
        longest = max(longest, r.embed_len)
        if chunks and longest * (len(chunks[-1]) + 1) <= MAX_PREFILL_TOKENS:
            chunks[-1].append(r)
        else:
            chunks.append([r])
            longest = r.embed_len
    return chunks


def length_groups(seqs: list[Sequence], slack: float = 1.25, floor: int = 16) -> list[list[Sequence]]:
    """Split newcomers into groups whose lengths differ little, so a prefill pads little; shortest first."""
    ordered = sorted(seqs, key=lambda s: s.embed_len)
    groups: list[list[Sequence]] = []
    for s in ordered:
        if groups and s.embed_len <= max(floor, slack * groups[-1][0].embed_len):
            groups[-1].append(s)
        else:
            groups.append([s])
    return groups
