"""Batch layout, filter and concatenate: exact tensor state, as TGI's batch tests do."""

from __future__ import annotations

import torch

from prompt_server.engine.batch import RunningBatch
from prompt_server.model.batch import KV, PrefillRow, build_prefill, pad_mask_left

L, KVH, D, H = 2, 1, 2, 3


def prefix(p: int, fill: float) -> torch.Tensor:
    return torch.full((L, 2, KVH, p, D), fill)


def test_prefill_layout_right_aligns_every_kind():
    rows = [
        PrefillRow(ids=[5, 6], prefix=prefix(2, 1.0)),
        PrefillRow(ids=[7], virtual=torch.ones(2, H)),
        PrefillRow(ids=[8, 9, 10]),
    ]
    inp = build_prefill(rows, pad_id=0, device=torch.device("cpu"))
    assert inp.ids.tolist() == [[0, 5, 6], [0, 0, 7], [8, 9, 10]]
    assert inp.virtual_mask.tolist() == [[False, False, False], [True, True, False], [False, False, False]]
    # columns: 2 prefix columns, then 3 embedding columns
    assert inp.mask.int().tolist() == [[1, 1, 0, 1, 1], [0, 0, 1, 1, 1], [0, 0, 1, 1, 1]]
    # prefix rows start at P, virtual-token rows count virtual tokens from 0
    assert inp.positions[0, 1:].tolist() == [2, 3]
    assert inp.positions[1].tolist() == [0, 1, 2]
    assert inp.positions[2].tolist() == [0, 1, 2]
    assert inp.past.shape == (L, 2, 3, KVH, 2, D)
    assert inp.past[:, :, 0].eq(1.0).all() and inp.past[:, :, 1:].eq(0).all()


def test_prefix_shorter_than_the_widest_sits_right_aligned():
    rows = [PrefillRow(ids=[1], prefix=prefix(1, 2.0)), PrefillRow(ids=[1], prefix=prefix(3, 3.0))]
    inp = build_prefill(rows, pad_id=0, device=torch.device("cpu"))
    assert inp.past[0, 0, 0, 0, :, 0].tolist() == [0.0, 0.0, 2.0]
    assert inp.mask.int().tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]]
    assert inp.positions.tolist() == [[1], [3]]


def kv_of(values: list[list[float]], capacity: int) -> KV:
    # one layer, one head, head_dim 1: row r column c holds values[r][c]
    t = torch.zeros(len(values), 1, capacity, 1)
    t[:, 0, : len(values[0]), 0] = torch.tensor(values)
    return KV([t], [t.clone()], len(values[0]))


class Row:
    def __init__(self, remaining: int):
        self.remaining = remaining


def batch_of(values, mask, capacity=6) -> RunningBatch:
    n = len(values)
    return RunningBatch(
        rows=[Row(3) for _ in range(n)],
        kv=kv_of(values, capacity),
        mask=torch.tensor(mask, dtype=torch.bool),
        positions=torch.arange(n) + 10,
        next_ids=torch.arange(n) + 100,
    )


def test_filter_keeps_rows_and_trims_columns_nobody_uses():
    b = batch_of([[0, 0, 1, 2], [0, 3, 4, 5], [6, 7, 8, 9]], [[0, 0, 1, 1], [0, 1, 1, 1], [1, 1, 1, 1]])
    f = b.filter([0, 1])
    assert f.kv.width == 3
    assert f.kv.keys[0][:, 0, :3, 0].tolist() == [[0, 1, 2], [3, 4, 5]]
    assert f.mask.int().tolist() == [[0, 1, 1], [1, 1, 1]]
    assert f.positions.tolist() == [10, 11]
    assert f.next_ids.tolist() == [100, 101]
    assert f.kv.capacity == 3 + 3  # spare columns for the longest remaining row
    assert b.filter([]) is None
    assert b.filter([0, 1, 2]) is b


def test_concatenate_right_aligns_the_narrower_batch():
    a = batch_of([[1, 2, 3]], [[1, 1, 1]])
    b = batch_of([[4]], [[1]])
    c = RunningBatch.concatenate([a, b])
    assert c.kv.width == 3
    assert c.kv.keys[0][:, 0, :3, 0].tolist() == [[1, 2, 3], [0, 0, 4]]
    assert c.mask.int().tolist() == [[1, 1, 1], [0, 0, 1]]
    assert c.positions.tolist() == [10, 10]
    assert c.next_ids.tolist() == [100, 100]
    assert len(c) == 2


def test_kv_reserve_keeps_contents_and_grows_capacity():
    kv = kv_of([[1, 2]], capacity=2)
    kv.reserve(1)
    assert kv.capacity >= 3 and kv.width == 2
    assert kv.keys[0][0, 0, :2, 0].tolist() == [1, 2]


def test_pad_mask_left():
    m = torch.tensor([[True, False]])
    assert pad_mask_left(m, 4).tolist() == [[False, False, True, False]]
    assert pad_mask_left(m, 2) is m
