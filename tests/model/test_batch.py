"""Batch layout, slots freed and filled, the cache laid out again: exact tensor state, as TGI's batch tests do."""

from __future__ import annotations

import torch

from prompt_server.engine.batch import RunningBatch
from prompt_server.model.batch import KV, PrefillRow, build_prefill

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
    past = torch.stack(inp.past())  # per layer -> [L, 2, n, kv_heads, Pmax, head_dim]
    assert past.shape == (L, 2, 3, KVH, 2, D)
    assert past[:, :, 0].eq(1.0).all() and past[:, :, 1:].eq(0).all()


def test_prefix_shorter_than_the_widest_sits_right_aligned():
    rows = [PrefillRow(ids=[1], prefix=prefix(1, 2.0)), PrefillRow(ids=[1], prefix=prefix(3, 3.0))]
    inp = build_prefill(rows, pad_id=0, device=torch.device("cpu"))
    assert inp.past()[0][0, 0, 0, :, 0].tolist() == [0.0, 0.0, 2.0]
    assert inp.mask.int().tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]]
    assert inp.positions.tolist() == [[1], [3]]


def test_a_cached_head_follows_the_prefix_in_the_rows_new_cache():
    """A row's soft prompt, then its cached head, right-aligned; the columns after the prefix are left to the runner,
    so nothing is laid out twice."""
    rows = [PrefillRow(ids=[1], prefix=prefix(2, 2.0), head=prefix(1, 5.0)),
            PrefillRow(ids=[1, 2], head=prefix(2, 7.0)), PrefillRow(ids=[3, 4])]
    inp = build_prefill(rows, pad_id=0, device=torch.device("cpu"))
    assert [r.prefix_len for r in rows] == [3, 2, 0] and inp.prefix_width == 3
    assert inp.mask.int().tolist() == [[1, 1, 1, 0, 1], [0, 1, 1, 1, 1], [0, 0, 0, 1, 1]]
    assert inp.positions.tolist() == [[0, 3], [2, 3], [0, 1]]
    like = torch.empty(3, KVH, 0, D)
    for layer in range(L):
        cache = inp.layer_cache(layer, 6, like)  # 3 prefix columns, then 3 for the runner
        assert cache.shape == (2, 3, KVH, 6, D)
        assert cache[:, :, 0, :3, 0].tolist() == [[[2.0, 2.0, 5.0], [0.0, 7.0, 7.0], [0.0, 0.0, 0.0]]] * 2
    assert [t[:, :, 0, :, 0].tolist() for t in inp.past()] == [[[[2.0, 2.0, 5.0], [0.0, 7.0, 7.0], [0.0] * 3]] * 2] * L


def test_room_adds_free_slots_and_empty_lead_columns_to_the_rows_new_cache():
    """with_room: the cache gets free slots past the rows and empty columns in front of every row's prefix, for
    running rows to join it; the rows' own layout, positions and tokens stay as they were."""
    rows = [PrefillRow(ids=[1], prefix=prefix(2, 2.0), head=prefix(1, 5.0)), PrefillRow(ids=[3, 4])]
    plain = build_prefill(rows, pad_id=0, device=torch.device("cpu"))
    inp = plain.with_room(slots=4, lead=2)
    assert (inp.prefix_width, inp.slots) == (5, 4)
    assert inp.mask.int().tolist() == [[0, 0, 1, 1, 1, 0, 1], [0, 0, 0, 0, 0, 1, 1]]
    assert inp.positions.tolist() == plain.positions.tolist() and inp.ids.tolist() == plain.ids.tolist()
    like = torch.empty(2, KVH, 0, D)
    for layer in range(L):
        torch.full((2, 4, KVH, 8, D), float("nan"))  # freed at once: memory the cache may get, NaNs and all
        cache = inp.layer_cache(layer, 8, like)
        assert cache.shape == (2, 4, KVH, 8, D)
        assert cache[:, :2, 0, :5, 0].tolist() == [[[0.0, 0.0, 2.0, 2.0, 5.0], [0.0] * 5]] * 2
        assert cache[:, 2:].eq(0).all()  # the free slots: finite for attention over them, until rows join
    assert plain.with_room(slots=2, lead=0).mask is plain.mask


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


def cols(b: RunningBatch) -> list[list[float]]:
    """Every slot's used columns (keys, layer 0)."""
    return b.kv.keys[0][:, 0, : b.kv.width, 0].tolist()


def test_filter_frees_slots_without_copying_the_cache():
    b = batch_of([[0, 0, 1, 2], [0, 3, 4, 5], [6, 7, 8, 9]], [[0, 0, 1, 1], [0, 1, 1, 1], [1, 1, 1, 1]])
    storage = b.kv.keys[0].data_ptr()
    f = b.filter([0, 2])
    assert f is b and len(f) == 2
    assert f.kv.keys[0].data_ptr() == storage and f.relayouts == 0  # nothing moved
    assert f.alive == [0, 2] and [r is None for r in f.rows] == [False, True, False]
    assert f.mask.int().tolist() == [[0, 0, 1, 1], [0, 0, 0, 0], [1, 1, 1, 1]]  # the freed slot is masked out
    assert f.slots.tolist() == [0, 2] and not f.dense
    assert f.positions[f.slots].tolist() == [10, 12]
    assert f.next_ids[f.slots].tolist() == [100, 102]
    assert f.start == 0
    assert b.filter([0, 1]) is b  # all rows kept
    assert b.filter([]) is None


def test_start_skips_columns_no_row_uses():
    b = batch_of([[0, 0, 1, 2], [0, 3, 4, 5]], [[0, 0, 1, 1], [0, 1, 1, 1]])
    assert b.start == 1
    b.filter([0])
    assert b.start == 2 and b.dense  # only slot 0 is left, it uses columns 2..3


def test_admit_writes_newcomers_into_free_slots_right_aligned():
    b = batch_of([[0, 0, 1, 2], [0, 3, 4, 5], [6, 7, 8, 9]], [[0, 0, 1, 1], [0, 1, 1, 1], [1, 1, 1, 1]])
    b.filter([0, 2])
    storage = b.kv.keys[0].data_ptr()
    new = batch_of([[40, 41]], [[1, 1]])
    new.positions[0], new.next_ids[0] = 50, 500
    b.admit(new, max_rows=8, max_tokens=10**6)
    assert b.kv.keys[0].data_ptr() == storage and b.relayouts == 0
    assert b.alive == [0, 1, 2] and b.dense
    assert cols(b)[1][2:] == [40, 41]  # the columns left of it are the freed row's, masked out
    assert b.mask.int().tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [1, 1, 1, 1]]
    assert b.positions.tolist() == [10, 50, 12] and b.next_ids.tolist() == [100, 500, 102]


def test_admit_takes_rows_from_any_slots_into_any_free_slots():
    """Both sides with holes: the newcomers' live slots 1 and 2 go, in order, into the batch's free slots 1 and 3,
    keys and values alike; the other slots are untouched."""
    b = batch_of([[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 9, 9]], [[1, 1, 1]] * 4)
    b.filter([0, 2])
    new = batch_of([[10, 11], [20, 21], [30, 31]], [[1, 1], [0, 1], [1, 1]])
    new.filter([1, 2])
    assert not new.dense and b.alive == [0, 2]
    b.admit(new, max_rows=8, max_tokens=10**6)
    assert b.relayouts == 0 and b.alive == [0, 1, 2, 3]
    expected = [[0, 1, 2], [3, 20, 21], [6, 7, 8], [9, 30, 31]]  # slot 1's first column: its freed row's, masked
    assert cols(b) == expected and b.kv.values[0][:, 0, :3, 0].tolist() == expected
    assert b.mask.int().tolist() == [[1, 1, 1], [0, 0, 1], [1, 1, 1], [0, 1, 1]]
    assert b.positions.tolist() == [10, 11, 12, 12] and b.next_ids.tolist() == [100, 101, 102, 102]


def test_join_writes_the_running_rows_into_a_part_with_room_for_them():
    """A running batch with no free slot and a prefilled part with one (PrefillInputs.with_room): the running row
    goes into the part's free slot, right-aligned, and the part's cache becomes the batch's; nothing is laid out
    again. Without room in the part, the part joins the batch as admit does."""
    running = batch_of([[6, 7, 8]], [[1, 1, 1]], capacity=4)
    part = batch_of([[0, 1, 2, 3], [0, 4, 5, 6]], [[0, 1, 1, 1], [0, 0, 1, 1]])
    part.rows[1] = None  # a free slot (the room)
    part.mask[1] = False
    part._changed()
    storage = part.kv.keys[0].data_ptr()
    joined = running.join(part, max_rows=8, max_tokens=10**6)
    assert joined is part and part.kv.keys[0].data_ptr() == storage and part.relayouts == 0
    assert cols(part)[1][1:] == [6, 7, 8] and part.mask.int().tolist() == [[0, 1, 1, 1], [0, 1, 1, 1]]
    assert part.positions.tolist() == [10, 10] and part.next_ids.tolist() == [100, 100]
    no_room = batch_of([[6, 7]], [[1, 1]])
    newcomer = batch_of([[1, 2]], [[1, 1]])
    assert no_room.join(newcomer, max_rows=8, max_tokens=10**6) is no_room and len(no_room) == 2
    assert no_room.relayouts == 1


def test_admit_lays_the_cache_out_again_only_when_it_must_grow():
    b = batch_of([[1, 2], [3, 4]], [[1, 1], [0, 1]], capacity=4)
    wide = batch_of([[5, 6, 7]], [[1, 1, 1]])
    b.admit(wide, max_rows=4, max_tokens=10**6)  # no free slot and a wider row: one copy into 4 slots, 3 columns
    assert b.relayouts == 1 and len(b.rows) == 4 and b.kv.width == 3
    assert cols(b) == [[0, 1, 2], [0, 3, 4], [5, 6, 7], [0, 0, 0]]
    assert b.mask.int().tolist() == [[0, 1, 1], [0, 0, 1], [1, 1, 1], [0, 0, 0]]
    assert b.kv.capacity == 3 + 3  # spare columns for the longest remaining row
    b.admit(batch_of([[8]], [[1]]), max_rows=4, max_tokens=10**6)  # a free slot and room: no copy
    assert b.relayouts == 1 and cols(b)[3] == [0, 0, 8]


def test_several_parts_of_one_step_cost_one_layout_not_one_each():
    """A step's newcomer groups, each wider than the last and together more than the free slots: make_room lays the
    cache out once, for all their rows and the widest of them; each then joins without another copy, right-aligned.
    Where they fit already, make_room copies nothing."""
    b = batch_of([[1, 2]], [[1, 1]], capacity=3)
    parts = [batch_of([[3, 4, 5]] * 2, [[1, 1, 1]] * 2), batch_of([[6, 7, 8, 9]], [[0, 1, 1, 1]])]
    b.make_room(parts, max_rows=8, max_tokens=10**6)
    # the widest part's first column is used by none of its rows: 3 columns hold them all
    assert b.relayouts == 1 and len(b.rows) == 4 and b.kv.width == 3
    assert b.kv.capacity == 3 + 3  # spare columns for the longest remaining row
    for part in parts:
        b = b.join(part, max_rows=8, max_tokens=10**6)
    assert b.relayouts == 1 and b.alive == [0, 1, 2, 3]
    assert cols(b) == [[0, 1, 2], [3, 4, 5], [3, 4, 5], [7, 8, 9]]
    assert b.mask.int().tolist() == [[0, 1, 1], [1, 1, 1], [1, 1, 1], [1, 1, 1]]
    assert b.kv.values[0][:, 0, :3, 0].tolist() == cols(b)
    b.filter([0, 3])
    b.make_room([batch_of([[1]], [[1]]), batch_of([[2, 3]], [[1, 1]])], max_rows=8, max_tokens=10**6)
    assert b.relayouts == 1  # two free slots and room for both: nothing moved
    # one at a time, the same parts would have laid the cache out twice: first for more rows, then for a wider one
    one = batch_of([[1, 2]], [[1, 1]], capacity=3)
    for part in (batch_of([[3, 4, 5]] * 2, [[1, 1, 1]] * 2), batch_of([[6, 7, 8, 9]], [[0, 1, 1, 1]])):
        one = one.join(part, max_rows=8, max_tokens=10**6)
    assert one.relayouts == 2


def test_slots_never_grow_past_max_rows_or_the_token_budget():
    b = batch_of([[1], [2], [3]], [[1], [1], [1]])
    b.admit(batch_of([[4]], [[1]]), max_rows=4, max_tokens=10**6)
    assert len(b.rows) == 4  # not 2 x 3
    b = batch_of([[1], [2], [3]], [[1], [1], [1]])
    b.admit(batch_of([[4]], [[1]]), max_rows=64, max_tokens=5 * (1 + 3))  # 1 column + 3 spare per slot
    assert len(b.rows) == 5
    b = batch_of([[1], [2], [3]], [[1], [1], [1]])
    b.admit(batch_of([[4]], [[1]]), max_rows=64, max_tokens=1)
    assert len(b.rows) == 4  # the rows admitted always get their slots


def test_a_mostly_free_cache_moves_its_rows_down():
    values = [[float(i)] for i in range(8)]
    b = batch_of(values, [[1]] * 8)
    b.filter([1, 3, 4, 6, 7])
    assert b.relayouts == 0 and len(b.rows) == 8  # 5 of 8 slots in use
    b.filter([1, 4])  # rows 3 and 7 left of 8 slots: moved into slots 0 and 1, the 8 slots stay
    assert b.relayouts == 1 and len(b.rows) == 8 and b.alive == [0, 1] and b.dense
    assert cols(b)[:2] == [[3.0], [7.0]]
    assert b.positions[:2].tolist() == [13, 17] and b.next_ids[:2].tolist() == [103, 107]


def test_free_slots_at_the_top_cost_no_copy():
    b = batch_of([[float(i)] for i in range(8)], [[1]] * 8)
    b.filter([0, 1])  # slots 0 and 1 stay: no hole below the highest used slot
    assert b.relayouts == 0 and b.dense and b.alive == [0, 1]


def test_reserve_drops_columns_no_row_uses_when_full():
    b = batch_of([[1, 2, 3], [4, 5, 6]], [[1, 1, 1], [0, 0, 1]], capacity=3)
    b.filter([1])
    b.reserve(1)
    assert b.relayouts == 1 and b.kv.width == 1 and cols(b) == [[6], [0]]
    assert b.kv.capacity >= 2 and b.mask.int().tolist() == [[1], [0]]


def test_kv_reserve_keeps_contents_and_grows_capacity():
    kv = kv_of([[1, 2]], capacity=2)
    kv.reserve(1)
    assert kv.capacity >= 3 and kv.width == 2
    assert kv.keys[0][0, 0, :2, 0].tolist() == [1, 2]
