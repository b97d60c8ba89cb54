"""The decode attention kernel (model/native.py): the same outputs as softmax attention written out in float64, for
the head shapes it specialises and any other, over kept and dropped columns, a subset of slots and an offset start;
bad arguments are refused with the reason; the loader uses it only where it is built and proven, else says why.
The engine's PEFT parity tests run through it (the lean path on the CPU in float32); the torch attention it replaces
keeps its own, tests/engine/test_torch_attention.py."""

from __future__ import annotations

import logging
import math
import shutil

import pytest
import torch

from prompt_server.config import default_cache_dir
from prompt_server.model import native
from prompt_server.model.loader import load_model

if shutil.which("c++") is None and shutil.which("g++") is None:
    pytest.skip("no C++ compiler to build the kernel with", allow_module_level=True)


@pytest.fixture(scope="module")
def kernel():
    return native.decode_attention(default_cache_dir())


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
    out = kernel(q, keys, values, rows, keep, start, scale)
    assert out.shape == q.shape and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), reference(q, keys, values, rows, keep, start, scale), atol=2e-6,
                               rtol=1e-5)


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
    out = kernel(q, keys, values, rows, keep, 4, 0.125)
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
        kernel(q, keys, values, rows, keep, start, 0.25)


def test_loader_serves_the_kernel_where_it_is_built_and_proven(tiny_llama_dir, tiny_gpt2_dir):
    loaded = load_model(tiny_llama_dir, device="cpu", progress=False)
    assert loaded.plan.forward_path == "lean" and loaded.plan.native_attention
    assert not load_model(tiny_llama_dir, device="cpu", progress=False, native_attention=False).plan.native_attention
    generic = load_model(tiny_gpt2_dir, device="cpu", progress=False)  # runs the model's own attention
    assert generic.plan.forward_path == "generic" and not generic.plan.native_attention


def test_a_kernel_that_cannot_be_built_leaves_torch_attention_and_says_why(tiny_llama_dir, monkeypatch, caplog):
    def fail(cache_dir):
        raise RuntimeError("the attention kernel could not be built: no compiler")

    monkeypatch.setattr(native, "decode_attention", fail)
    with caplog.at_level(logging.WARNING, logger="prompt_server.model.loader"):
        loaded = load_model(tiny_llama_dir, device="cpu", progress=False)
    assert loaded.plan.forward_path == "lean" and not loaded.plan.native_attention
    assert "decode attention runs on torch's kernels: the attention kernel could not be built: no compiler" in caplog.text


def test_other_dtypes_are_not_served_by_the_kernel(tiny_llama_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="prompt_server.model.loader"):
        loaded = load_model(tiny_llama_dir, device="cpu", dtype="bfloat16", progress=False)
    assert loaded.plan.forward_path == "lean" and not loaded.plan.native_attention
    assert "float32 on the CPU, not torch.bfloat16" in caplog.text

