"""The running batch: rows kept aligned with the cache, the mask and the positions; filter and concatenate."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prompt_server.engine.sequence import Sequence
from prompt_server.model.batch import KV, PrefillRow, pad_mask_left

# Free cache columns kept ahead of the rows so decoding writes in place; bounded to cap the memory a batch holds.
MAX_SPARE = 256
# Padded tokens one prefill may run at once; newcomers beyond it wait for the next step.
MAX_PREFILL_TOKENS = 8192


def spare_for(rows: list[Sequence]) -> int:
    return min(MAX_SPARE, max((r.remaining for r in rows), default=1))


@dataclass
class RunningBatch:
    rows: list[Sequence]
    kv: KV
    mask: torch.Tensor  # [B, W] bool, True where a row has a real column
    positions: torch.Tensor  # [B] position of the token each row feeds next
    next_ids: torch.Tensor  # [B] the token each row feeds next

    def __len__(self) -> int:
        return len(self.rows)

    def filter(self, keep: list[int]) -> RunningBatch | None:
        """Keep the rows at `keep`, dropping columns no kept row uses any more."""
        if not keep:
            return None
        if len(keep) == len(self.rows):
            return self
        idx = torch.tensor(keep, device=self.mask.device)
        mask = self.mask[idx]
        used = mask.any(dim=0).nonzero()
        start = int(used[0]) if len(used) else 0
        rows = [self.rows[i] for i in keep]
        return RunningBatch(
            rows=rows,
            kv=self.kv.select(idx, start, spare_for(rows)),
            mask=mask[:, start:],
            positions=self.positions[idx],
            next_ids=self.next_ids[idx],
        )

    @staticmethod
    def concatenate(batches: list[RunningBatch]) -> RunningBatch:
        """One batch of all rows, right-aligned to the widest."""
        if len(batches) == 1:
            return batches[0]
        rows = [r for b in batches for r in b.rows]
        width = max(b.kv.width for b in batches)
        return RunningBatch(
            rows=rows,
            kv=KV.concatenate([b.kv for b in batches], spare_for(rows)),
            mask=torch.cat([pad_mask_left(b.mask[:, : b.kv.width], width) for b in batches]),
            positions=torch.cat([b.positions for b in batches]),
            next_ids=torch.cat([b.next_ids for b in batches]),
        )


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
