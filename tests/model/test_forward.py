"""The lean runner's CPU arithmetic: weight-first products and padded row counts change no result."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from prompt_server.model import forward
from prompt_server.model.batch import PrefillRow, build_prefill
from prompt_server.model.loader import load_model
from tests.tiny import save_tiny_arch


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 5, 32])
def test_the_weight_first_product_is_the_linear_layer(bias, rows):
    torch.manual_seed(0)
    linear = torch.nn.Linear(48, 80, bias=bias)
    x = torch.randn(rows, 48)
    y = forward._linear_weight_first(linear, x)
    assert y.shape == (rows, 80)
    torch.testing.assert_close(y, F.linear(x, linear.weight, linear.bias), rtol=0, atol=1e-5)


def test_row_counts_are_padded_to_four_then_to_multiples_of_eight():
    assert [forward._cpu_rows(n) for n in (1, 3, 4, 5, 8, 9, 16, 17, 31, 32, 33)] == [
        4, 4, 4, 8, 8, 16, 16, 24, 32, 32, 40]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # qwen2: q/k/v biases, so zero rows do not stay zero
def test_padding_rows_changes_no_hidden_state(arch, tmp_path):
    loaded = load_model(save_tiny_arch(arch, tmp_path / arch), device="cpu", progress=False)
    runner = forward.make_runner(loaded.model, "lean")
    assert runner.pad_rows is forward._cpu_rows
    rows = [PrefillRow(ids=[5, 6, 7, 8, 9]), PrefillRow(ids=[11, 12])]  # 2 x 5 tokens -> 16 rows
    inputs = build_prefill(rows, 0, torch.device("cpu"))
    with torch.inference_mode():
        padded, kv_padded = runner.prefill(inputs, 2)
        runner.pad_rows = int  # exactly as many rows as tokens
        plain, kv_plain = runner.prefill(inputs, 2)
    torch.testing.assert_close(padded, plain, rtol=0, atol=1e-5)
    for a, b in zip(kv_padded.keys + kv_padded.values, kv_plain.keys + kv_plain.values):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_a_prefill_with_room_computes_what_one_without_does(tmp_path):
    """PrefillInputs.with_room: free slots after the rows and empty lead columns in front of them change no hidden
    state and none of the rows' keys/values; the free slots and the lead columns stay zero."""
    loaded = load_model(save_tiny_arch("llama", tmp_path / "llama"), device="cpu", progress=False)
    runner = forward.make_runner(loaded.model, "lean")
    assert runner.prefills_with_room
    gen = torch.Generator().manual_seed(0)
    soft = torch.randn(2, 2, 2, 3, 16, generator=gen)  # a prefix of 3 columns: [layers, k/v, kv heads, P, head dim]
    rows = [PrefillRow(ids=[5, 6, 7], prefix=soft), PrefillRow(ids=[11, 12])]
    plain_inputs = build_prefill(rows, 0, torch.device("cpu"))
    with torch.inference_mode():
        plain, kv_plain = runner.prefill(plain_inputs, 2)
        roomy, kv_roomy = runner.prefill(plain_inputs.with_room(slots=5, lead=4), 2)
    torch.testing.assert_close(roomy, plain, rtol=0, atol=1e-6)
    assert kv_roomy.batch_size == 5 and kv_roomy.width == kv_plain.width + 4
    for a, b in zip(kv_roomy.keys + kv_roomy.values, kv_plain.keys + kv_plain.values):
        torch.testing.assert_close(a[:2, :, 4:], b, rtol=0, atol=1e-6)
        assert a[:2, :, :4].eq(0).all() and a[2:].eq(0).all()


def test_only_pieces_two_rows_share_are_redirected_with_the_column_they_start_at():
    """_redirects: per row (its first redirected piece's column, then (piece, columns) for each, -1 after); a piece
    only one row has is read from the row's copy, so a row may start at its second piece; one cached head shared by
    rows that use different lengths of it is one piece; rows without shared pieces, with a piece their cache let go
    (None), with a piece of another shape, or whose mask does not keep the pieces' columns get -1."""
    def piece(p, heads=1):
        return torch.zeros(2, 2, heads, p, 8)

    soft, head, own, own2, cached, wrong = piece(3), piece(2), piece(5), piece(6), piece(9), piece(4, heads=2)
    pieces = [[(soft, 3), (head, 2)], [(soft, 3), (cached, 4)], [(own2, 6), (cached, 7)], [(own, 5)], [],
              [(None, 3), (cached, 4)], [(wrong, 4)], [(wrong, 4)], [(soft, 3)]]
    mask = torch.zeros(10, 24, dtype=torch.bool)
    rows = torch.tensor([0, 1, 2, 4, 5, 6, 7, 8, 9])  # slot 3 is free
    for slot, first in zip(rows.tolist(), [2, 0, 1, 3, 7, 0, 0, 0, 4]):
        mask[slot, first:] = True
    mask[9, 5] = False  # a hole inside the columns its soft prompt would stand for
    like = torch.zeros(10, 1, 24, 8)  # a layer's keys: 1 KV head of 8
    shared, table = forward._redirects(pieces, mask, rows, like, 2)
    assert [id(t) for t in shared] == [id(soft), id(cached)]
    assert table.tolist() == [
        [2, 0, 3, -1, -1],  # soft shared, its own head not
        [0, 0, 3, 1, 4],  # soft, then 4 columns of the cached head
        [1 + 6, 1, 7, -1, -1],  # its own piece read from its copy; 7 columns of the cached head after it
        [3, -1, -1, -1, -1],
        [7, -1, -1, -1, -1],
        [0 + 3, 1, 4, -1, -1],  # its soft prompt evicted: read from its copy; the head after it
        [0, -1, -1, -1, -1],  # another model's shape: never redirected
        [0, -1, -1, -1, -1],
        [4, -1, -1, -1, -1],  # the mask does not keep all of its soft prompt's columns
    ]
    assert forward._redirects([[(own, 5)], [(own2, 6)], []], mask[:3], torch.arange(3), like, 2) == ([], None)
    assert forward._redirects([[(None, 3)], [(None, 3)]], mask[:2], torch.arange(2), like, 2) == ([], None)
    assert forward._redirects(None, mask, rows, like, 2) == ([], None)


def test_a_row_redirects_every_piece_of_its_first_run_of_shared_ones():
    """A prefix adapter's keys/values, then a cached head the prefix tree split into three spans: every one of them
    shared is redirected, however many, and the table is as wide as the longest run; a run stops at the first piece
    the row does not share (the rest is read from its copy, even a shared piece after it)."""
    def piece(p):
        return torch.zeros(2, 2, 1, p, 8)

    prefix, a, b, c, own, own2 = piece(4), piece(3), piece(2), piece(5), piece(6), piece(6)
    pieces = [[(prefix, 4), (a, 3), (b, 2), (c, 5)],  # all four shared
              [(prefix, 4), (a, 3), (b, 2), (c, 1)],  # the last span, used shorter
              [(prefix, 4), (a, 3), (own, 6), (c, 2)],  # its own span ends the run: c is read from its copy
              [(own2, 6)]]
    mask = torch.ones(4, 20, dtype=torch.bool)
    mask[3, :14] = False
    shared, table = forward._redirects(pieces, mask, torch.arange(4), torch.zeros(4, 1, 20, 8), 2)
    assert [id(t) for t in shared] == [id(prefix), id(a), id(b), id(c)]
    assert table.tolist() == [
        [0, 0, 4, 1, 3, 2, 2, 3, 5],
        [0, 0, 4, 1, 3, 2, 2, 3, 1],
        [0, 0, 4, 1, 3, -1, -1, -1, -1],
        [14, -1, -1, -1, -1, -1, -1, -1, -1],
    ]
    # pieces standing for more columns than the row's window holds are never redirected
    short = torch.ones(2, 6, dtype=torch.bool)
    _, table = forward._redirects([[(prefix, 4), (a, 3)]] * 2, short, torch.arange(2), torch.zeros(2, 1, 6, 8), 2)
    assert table.tolist() == [[0, -1, -1, -1, -1]] * 2
