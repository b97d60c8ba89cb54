"""The CPU kernels (model/native.py).

Decode attention: the same outputs as softmax attention written out in float64, for the head shapes it specialises
and any other, over kept and dropped columns, a subset of slots and an offset start. The few-row projection: the
same as a float64 product for every tail of its 4-row and 3-column blocks, with and without bias. The prefix
layout: the same columns as torch's indexed copies. All refuse bad arguments with the reason; the lean runner uses the projection up to FEW_ROWS rows (and the vocabulary projection up
to HEAD_ROWS) and gives the hidden states and logits of torch's path; the loader uses the kernels only where they are
built and proven, else says why. The engine's PEFT parity tests run through them (the lean path on the CPU in
float32); torch's attention keeps its own, tests/engine/test_torch_attention.py."""

from __future__ import annotations

import logging
import math
import shutil

import pytest
import torch

from prompt_server.config import default_cache_dir
from prompt_server.model import forward, native
from prompt_server.model.batch import PrefillRow, build_prefill
from prompt_server.model.forward import DecodeInputs
from prompt_server.model.loader import load_model

if shutil.which("c++") is None and shutil.which("g++") is None:
    pytest.skip("no C++ compiler to build the kernel with", allow_module_level=True)


@pytest.fixture(scope="module")
def kernel():
    return native.load(default_cache_dir()).decode_attention


@pytest.fixture(scope="module")
def linear():
    return native.load(default_cache_dir()).linear


def reference(q, keys, values, rows, keep, start, scale):
    """Softmax attention over each row's kept columns, in float64. q [n, KV, G, D] -> [n, KV, G, D]."""
    w = keep.shape[1]
    # the columns a row drops may hold anything (the tests put NaN there: the kernel must not read them)
    k = keys[rows, :, start : start + w].double().nan_to_num(0)  # [n, KV, W, D]
    v = values[rows, :, start : start + w].double().nan_to_num(0)
    scores = torch.einsum("nhgd,nhwd->nhgw", q.double(), k) * scale
    scores = scores.masked_fill(~keep[rows][:, None, None, :], float("-inf"))
    return torch.einsum("nhgw,nhwd->nhgd", scores.softmax(-1), v)


# (KV heads, query heads per KV head, head size): the default model's and other specialised shapes, then shapes the
# generic loop serves (head sizes 16 and 24, 7 queries per KV head at 64)
SHAPES = [(3, 3, 64), (2, 1, 128), (1, 4, 64), (2, 8, 128), (2, 2, 16), (1, 3, 24), (2, 7, 64)]


@pytest.mark.parametrize("kv,g,d", SHAPES)
@pytest.mark.parametrize("width", [1, 7, 8, 33, 170])
def test_kernel_matches_softmax_attention(kernel, kv, g, d, width):
    gen = torch.Generator().manual_seed(kv * 1000 + g * 100 + d + width)
    slots, start, capacity = 6, 3, width + 5
    keys = torch.randn(slots, kv, capacity, d, generator=gen)
    values = torch.randn(slots, kv, capacity, d, generator=gen)
    rows = torch.tensor([0, 2, 3, 5])  # slots 1 and 4 are free: never read
    keys[[1, 4]] = values[[1, 4]] = float("nan")
    q = torch.randn(len(rows), kv, g, d, generator=gen) * 2
    keep = torch.rand(slots, width, generator=gen) > 0.3  # holes anywhere, as prefixes and padding leave them
    keep[:, -1] = True  # the column each row writes this step
    keep[2, : width // 2] = False  # a row that joined late: its leading columns are not its own
    # columns outside the kept ones are never read either
    keys[:, :, :start] = values[:, :, :start] = float("nan")
    dropped = ~keep[rows]
    for i, slot in enumerate(rows.tolist()):
        keys[slot, :, start:start + width][:, dropped[i]] = float("nan")
        values[slot, :, start:start + width][:, dropped[i]] = float("nan")
    scale = 1 / math.sqrt(d)
    out = kernel(q, keys, values, rows, keep, start, scale, [], None, 0)
    assert out.shape == q.shape and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), reference(q, keys, values, rows, keep, start, scale), atol=2e-6,
                               rtol=1e-5)


@pytest.mark.parametrize("kv,g,d", [(3, 3, 64), (1, 3, 24)])  # a specialised shape and the generic loop
def test_kernel_reads_shared_pieces_where_the_rows_columns_were_copied_from(kernel, kv, g, d):
    """Rows whose first kept columns are copies of shared pieces (a prefix, then a cached head in three spans; a soft
    prompt, then a cached head; one piece; none; two rows on the same pieces): given the pieces, the kernel reads
    those columns there, bit for bit the result of reading the copies, and with the copies overwritten by garbage
    still the result for the pieces' values."""
    gen = torch.Generator().manual_seed(11)
    layers, layer, slots, start, width = 3, 1, 7, 2, 40
    soft = torch.randn(layers, 2, kv, 9, d, generator=gen)  # [L, 2, KV, P, D]
    head = torch.randn(layers, 2, kv, 5, d, generator=gen)
    other = torch.randn(layers, 2, kv, 4, d, generator=gen)
    spans = [torch.randn(layers, 2, kv, p, d, generator=gen) for p in (3, 1, 6)]
    keys = torch.randn(slots, kv, start + width + 3, d, generator=gen)
    values = torch.randn(slots, kv, start + width + 3, d, generator=gen)
    keep = torch.rand(slots, width, generator=gen) > 0.3
    keep[:, -1] = True
    rows = torch.tensor([0, 1, 3, 4, 5, 6])
    plan = {0: ([soft, head], 4), 1: ([soft, head], 2), 3: ([other], 0), 4: ([], 0), 5: ([soft], 11),
            6: ([other, *spans], 7)}
    shared = [soft, head, other, *spans]
    index = {id(t): i for i, t in enumerate(shared)}
    redirect = torch.full((len(rows), 9), -1, dtype=torch.long)
    for i, slot in enumerate(rows.tolist()):
        pieces, first = plan[slot]
        keep[slot, :first] = False
        at = start + first
        redirect[i, 0] = at
        for j, t in enumerate(pieces):
            p = t.shape[3]
            keys[slot, :, at : at + p] = t[layer, 0]
            values[slot, :, at : at + p] = t[layer, 1]
            keep[slot, at - start : at - start + p] = True
            redirect[i, 1 + 2 * j], redirect[i, 2 + 2 * j] = index[id(t)], p
            at += p
        redirect[i, 3 + 2 * len(pieces) :: 2] = 0  # past the -1 that ends a row's list: never read
        redirect[i, 4 + 2 * len(pieces) :: 2] = 40
    q = torch.randn(len(rows), kv, g, d, generator=gen)
    scale = 1 / math.sqrt(d)
    copies = kernel(q, keys, values, rows, keep, start, scale, [], None, 0)
    shared_out = kernel(q, keys, values, rows, keep, start, scale, shared, redirect, layer)
    assert torch.equal(shared_out, copies)
    expected = reference(q, keys, values, rows, keep, start, scale)
    for i, slot in enumerate(rows.tolist()):  # the copies overwritten: only the pieces hold the values now
        pieces, first = plan[slot]
        p = sum(t.shape[3] for t in pieces)
        keys[slot, :, start + first : start + first + p] = 1e4
        values[slot, :, start + first : start + first + p] = float("nan")
    got = kernel(q, keys, values, rows, keep, start, scale, shared, redirect, layer)
    torch.testing.assert_close(got.double(), expected, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("case,message", [
    ("index", "names piece 3"),
    ("columns", "names piece 0 for 10 columns"),
    ("window", "leave the window"),
    ("layer", "holding layer 2"),
    ("shape", "redirect: long"),
    ("third", "names piece 0 for 10 columns"),
    ("empty", "names piece 0 for 0 columns"),
    ("overflow", "leave the window"),
])
def test_kernel_refuses_bad_pieces_with_the_reason(kernel, case, message):
    q = torch.randn(2, 1, 2, 16)
    keys = values = torch.randn(2, 1, 12, 16)
    rows, keep = torch.arange(2), torch.ones(2, 8, dtype=torch.bool)
    pieces = [torch.randn(2, 2, 1, 6, 16)]
    redirect = torch.tensor([[1, 0, 6, -1, 0], [1, -1, 0, -1, 0]])
    layer = 1
    if case == "third":  # any width 1 + 2K: every piece listed is checked
        redirect = torch.tensor([[1, 0, 2, 0, 3, 0, 10], [1, -1, 0, -1, 0, -1, 0]])
    elif case == "index":
        redirect[0, 1] = 3
    elif case == "columns":
        redirect[0, 2] = 10
    elif case == "window":
        redirect[0, 0] = 5  # columns 5..10 of a window of 1..8
    elif case == "empty":
        redirect[0, 2] = 0
    elif case == "overflow":  # a first column so large that first + columns would wrap around
        redirect[0, 0] = 2**63 - 2
    elif case == "layer":
        layer = 2
    elif case == "shape":
        redirect = redirect[:, :4].contiguous()
    with pytest.raises(RuntimeError, match=message):
        kernel(q, keys, values, rows, keep, 1, 0.25, pieces, redirect, layer)


def test_kernel_reads_the_cache_through_views(kernel):
    """keys/values as the running batch holds them: a slice of slots of a larger cache, any capacity."""
    gen = torch.Generator().manual_seed(7)
    full_k = torch.randn(9, 3, 40, 64, generator=gen)
    full_v = torch.randn(9, 3, 40, 64, generator=gen)
    keys, values = full_k[:5], full_v[:5]
    q = torch.randn(5, 3, 3, 64, generator=gen)
    mask = torch.ones(5, 30, dtype=torch.bool)
    keep = mask[:, 4:]  # a view with a row stride of 30
    rows = torch.arange(5)
    out = kernel(q, keys, values, rows, keep, 4, 0.125, [], None, 0)
    torch.testing.assert_close(out.double(), reference(q, keys, values, rows, keep, 4, 0.125), atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("case,message", [
    ("half", "q: contiguous float32"),
    ("head", "multiple of 8"),
    ("columns", "covering the columns"),
    ("slot", "slot out of range"),
    ("rows", "rows: long"),
])
def test_kernel_refuses_bad_arguments_with_the_reason(kernel, case, message):
    q = torch.randn(2, 1, 2, 16)
    keys = values = torch.randn(2, 1, 10, 16)
    rows, keep, start = torch.arange(2), torch.ones(2, 8, dtype=torch.bool), 1
    if case == "half":
        q = q.half()
    elif case == "head":
        q, keys = torch.randn(2, 1, 2, 12), torch.randn(2, 1, 10, 12)
        values = keys
    elif case == "columns":
        start = 3  # 3 + 8 > 10
    elif case == "slot":
        rows = torch.tensor([0, 2])
    elif case == "rows":
        rows = rows.int()
    with pytest.raises(RuntimeError, match=message):
        kernel(q, keys, values, rows, keep, start, 0.25, [], None, 0)


def test_loader_serves_the_kernel_where_it_is_built_and_proven(tiny_llama_dir, tiny_gpt2_dir):
    loaded = load_model(tiny_llama_dir, device="cpu", progress=False)
    assert loaded.plan.forward_path == "lean" and loaded.plan.native_kernels
    assert not load_model(tiny_llama_dir, device="cpu", progress=False, native_kernels=False).plan.native_kernels
    generic = load_model(tiny_gpt2_dir, device="cpu", progress=False)  # runs the model's own attention
    assert generic.plan.forward_path == "generic" and not generic.plan.native_kernels


def test_kernels_that_cannot_be_built_leave_torch_kernels_and_say_why(tiny_llama_dir, monkeypatch, caplog):
    def fail(cache_dir):
        raise RuntimeError("the kernels could not be built: no compiler")

    monkeypatch.setattr(native, "load", fail)
    with caplog.at_level(logging.WARNING, logger="prompt_server.model.loader"):
        loaded = load_model(tiny_llama_dir, device="cpu", progress=False)
    assert loaded.plan.forward_path == "lean" and not loaded.plan.native_kernels
    assert "the lean forward runs on torch's kernels only: the kernels could not be built: no compiler" in caplog.text


def test_other_dtypes_are_not_served_by_the_kernel_and_are_told_so_without_a_warning(tiny_llama_dir, caplog):
    """The kernels are for float32 on the CPU: another dtype (or a GPU) runs torch's, which is no fault to warn of."""
    with caplog.at_level(logging.INFO, logger="prompt_server.model.loader"):
        loaded = load_model(tiny_llama_dir, device="cpu", dtype="bfloat16", progress=False)
    assert loaded.plan.forward_path == "lean" and not loaded.plan.native_kernels
    said = [r for r in caplog.records if "float32 on the CPU, not torch.bfloat16" in r.getMessage()]
    assert [r.levelno for r in said] == [logging.INFO]



@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("k", [8, 24, 576])
@pytest.mark.parametrize("n", [1, 2, 3, 4, 7, 192])
def test_linear_matches_a_float64_product(linear, bias, k, n):
    """Every row count up to past two 4-row blocks and beyond FEW_ROWS, every column tail of the 3-column tiles."""
    gen = torch.Generator().manual_seed(k * 1000 + n)
    w = torch.randn(n, k, generator=gen) / math.sqrt(k)
    b = torch.randn(n, generator=gen) if bias else None
    for m in [1, 2, 3, 4, 5, 6, 7, 8, 9, 13, 24, 33]:
        x = torch.randn(m, k, generator=gen)
        y = linear(x, w, b)
        want = x.double() @ w.double().t() + (0 if b is None else b.double())
        assert y.shape == (m, n) and y.dtype == torch.float32
        torch.testing.assert_close(y.double(), want, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("case,message", [
    ("half", "must be float32"),
    ("inner", "multiple of 8"),
    ("mismatch", "x has 16 columns but w has 24"),
    ("strided", "must be contiguous"),
    ("bias", "bias must be a contiguous float32"),
    ("shape", "x must be"),
])
def test_linear_refuses_bad_arguments_with_the_reason(linear, case, message):
    x, w, b = torch.randn(3, 16), torch.randn(5, 16), None
    if case == "half":
        x = x.half()
    elif case == "inner":
        x, w = torch.randn(3, 12), torch.randn(5, 12)
    elif case == "mismatch":
        w = torch.randn(5, 24)
    elif case == "strided":
        x = torch.randn(16, 3).t()
    elif case == "bias":
        b = torch.randn(4)
    elif case == "shape":
        x = torch.randn(3, 16, 1)
    with pytest.raises(RuntimeError, match=message):
        linear(x, w, b)


@pytest.fixture(scope="module")
def layout():
    return native.load(default_cache_dir()).layout


def test_layout_places_every_piece_as_torch_does(layout):
    """Soft prompts and cached heads of different widths, a row without either, free slots and lead columns: the
    native layout writes every prefix column torch's indexed copies write, and zeroes the same ones."""
    gen = torch.Generator().manual_seed(3)
    layers, kvh, d = 3, 2, 16

    def piece(columns):
        return torch.randn(layers, 2, kvh, columns, d, generator=gen)

    rows = [PrefillRow(ids=[1, 2], prefix=piece(5), head=piece(3)), PrefillRow(ids=[4], prefix=piece(2)),
            PrefillRow(ids=[5, 6, 7]), PrefillRow(ids=[8], head=piece(4))]
    inputs = build_prefill(rows, 0, torch.device("cpu")).with_room(slots=6, lead=2)
    like = torch.empty(len(rows), kvh, 0, d)
    pmax = inputs.prefix_width
    assert pmax == 10
    for layer in range(layers):
        torch.full((2, 6, kvh, pmax + 4, d), float("nan"))  # freed at once: memory the cache may get, NaNs and all
        ours = inputs.layer_cache(layer, pmax + 4, like, layout)
        theirs = inputs.layer_cache(layer, pmax + 4, like)
        assert ours.shape == theirs.shape == (2, 6, kvh, pmax + 4, d)
        assert torch.equal(ours[:, :, :, :pmax], theirs[:, :, :, :pmax])
        assert ours[:, 4:].eq(0).all() and ours[:, 2, :, :pmax].eq(0).all()  # free slots; the row without a prefix
        assert torch.equal(ours[:, 0, :, 2:7], rows[0].prefix[layer]) and torch.equal(ours[:, 3, :, 6:10],
                                                                                      rows[3].head[layer])
    # no row with a prefix, but lead columns in front of them all: only zeroes to write
    bare = build_prefill([PrefillRow(ids=[1]), PrefillRow(ids=[2, 3])], 0, torch.device("cpu")).with_room(3, 2)
    for layer in range(layers):
        torch.full((2, 3, kvh, 5, d), float("nan"))
        assert bare.layer_cache(layer, 5, like[:2], layout)[:, :, :, :2].eq(0).all()


@pytest.mark.parametrize("case,message", [
    ("wide", "does not fit"),
    ("dtype", "of out's dtype"),
    ("strided", "blocks must be contiguous"),
    ("fill", "cannot have 9 zeroed columns"),
])
def test_layout_refuses_bad_arguments_with_the_reason(layout, case, message):
    out, piece, fill = torch.empty(2, 2, 1, 8, 4), torch.randn(2, 2, 1, 3, 4), [0, 0]
    column = 0
    if case == "wide":
        column = 6
    elif case == "dtype":
        piece = piece.double()
    elif case == "strided":
        piece = torch.randn(2, 2, 1, 4, 3).transpose(3, 4)
    elif case == "fill":
        fill = [9, 0]
    with pytest.raises(RuntimeError, match=message):
        layout(out, [piece], [0], [column], fill, 1)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # qwen2: q/k/v biases
def test_the_runner_with_kernels_gives_torch_paths_hidden_states_and_logits(arch, tmp_path):
    """Prefills of few and of more than FEW_ROWS tokens, and of one token per row behind soft prompts and cached
    heads of different widths (a decode step's attention), then a decode step: the same hidden states, cache and
    logits as the runner without kernels."""
    from tests.tiny import save_tiny_arch

    native.load(default_cache_dir())
    loaded = load_model(save_tiny_arch(arch, tmp_path / arch), device="cpu", progress=False)
    with_kernels = forward.make_runner(loaded.model, "lean", native=True)
    plain = forward.make_runner(loaded.model, "lean")
    assert with_kernels.head_kernel is not None and plain.head_kernel is None
    gen = torch.Generator().manual_seed(0)

    def kv_of(columns: int) -> torch.Tensor:  # [layers, k/v, kv heads, columns, head dim] of the tiny model
        return torch.randn(2, 2, 2, columns, 16, generator=gen)

    behind = [PrefillRow(ids=[9], prefix=kv_of(3)), PrefillRow(ids=[11], prefix=kv_of(5), head=kv_of(2)),
              PrefillRow(ids=[12])]
    for lengths in ([3], [5, 2], [forward.FEW_ROWS + 3, 9], behind):  # 3, 10, 2 x 43 tokens; 1 token per row
        rows = behind if lengths is behind else [
            PrefillRow(ids=[(7 * i + j) % 90 + 3 for j in range(n)]) for i, n in enumerate(lengths)]
        inputs = build_prefill(rows, 0, torch.device("cpu"))
        outs = []
        for runner in (with_kernels, plain):
            with torch.inference_mode():
                hidden, kv = runner.prefill(inputs, 2)
                b = len(rows)
                step = DecodeInputs(ids=torch.tensor([4] * b), kv=kv, mask=torch.cat(
                    [inputs.mask, torch.ones(b, 1, dtype=torch.bool)], 1), positions=inputs.positions[:, -1] + 1)
                decoded = runner.decode(step)
                outs.append((hidden, runner.logits(hidden[:, -1]), kv, decoded, runner.logits(decoded)))
        (h1, l1, kv1, d1, dl1), (h2, l2, kv2, d2, dl2) = outs
        for a, b_ in [(h1, h2), (l1, l2), (d1, d2), (dl1, dl2), *zip(kv1.keys + kv1.values, kv2.keys + kv2.values)]:
            torch.testing.assert_close(a, b_, rtol=0, atol=2e-5)


def test_the_kernel_decides_by_row_count():
    assert [forward._kernel_rows(n) for n in (1, 3, 5, forward.FEW_ROWS, forward.FEW_ROWS + 1)] == [
        1, 3, 5, forward.FEW_ROWS, forward._cpu_rows(forward.FEW_ROWS + 1)]


def test_layers_the_kernel_cannot_take_stay_on_mkl(tmp_path):
    """An MLP of 100 columns (not a multiple of 8): the runner decides once that MKL serves every projection, the
    vocabulary projection still runs on the kernel, and the step matches torch's path."""
    from tests.tiny import save_tiny_arch

    native.load(default_cache_dir())
    loaded = load_model(save_tiny_arch("llama", tmp_path / "odd", intermediate_size=100), device="cpu",
                        progress=False)
    runner = forward.make_runner(loaded.model, "lean", native=True)
    plain = forward.make_runner(loaded.model, "lean")
    assert runner.linear is forward._linear_weight_first and runner.pad_rows is forward._cpu_rows
    assert runner.head_kernel is not None and runner.decode_kernel is not None
    inputs = build_prefill([PrefillRow(ids=[5, 6, 7])], 0, torch.device("cpu"))
    with torch.inference_mode():
        (h1, _), (h2, _) = runner.prefill(inputs, 1), plain.prefill(inputs, 1)
        torch.testing.assert_close(runner.logits(h1[:, -1]), plain.logits(h2[:, -1]), rtol=0, atol=2e-5)
    torch.testing.assert_close(h1, h2, rtol=0, atol=2e-5)
