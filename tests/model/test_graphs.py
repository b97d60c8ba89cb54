"""The decode step a CUDA graph records (model/graphs.py), run here without recording it: the same hidden states and
keys/values as the eager step, over every slot and a bucket of columns; and when graphs are captured, reused and
dropped. tests/engine/test_cuda.py records and replays it on a GPU."""

from __future__ import annotations

import logging

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from prompt_server.model import graphs
from prompt_server.model.batch import KV, PrefillRow, build_prefill
from prompt_server.model.forward import DecodeInputs, LlamaRunner, make_runner
from prompt_server.model.loader import load_model
from tests.tiny import save_tiny_arch

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def runner(tmp_path_factory) -> LlamaRunner:
    loaded = load_model(save_tiny_arch("llama", tmp_path_factory.mktemp("llama")), device="cpu", progress=False,
                        native_kernels=False)
    r = make_runner(loaded.model, "lean", graphs=True)
    assert isinstance(r, LlamaRunner) and r.graphs is None  # no CUDA device: never graphs
    return r


def _running(runner: LlamaRunner, slots: int, lead: int = 0):
    """Three rows of different lengths, one behind a prefix, prefilled into a cache of `slots` slots with 4 spare
    columns and `lead` columns no row uses in front, on the runner's device: -> (kv, mask [slots, W] bool, next ids
    [3], positions [3])."""
    device = runner.embed_tokens.weight.device
    gen = torch.Generator().manual_seed(0)
    prefix = torch.randn(2, 2, 2, 3, 16, generator=gen).to(device, runner.embed_tokens.weight.dtype)
    rows = [PrefillRow(ids=[5, 6, 7, 8, 9, 10]), PrefillRow(ids=[11, 12], prefix=prefix), PrefillRow(ids=[13, 14, 15])]
    inputs = build_prefill(rows, 0, device).with_room(slots=slots, lead=lead)
    with torch.inference_mode():
        _, kv = runner.prefill(inputs, 4)
    mask = torch.zeros(slots, kv.width, dtype=torch.bool, device=device)
    mask[:3] = inputs.mask
    return kv, mask, torch.tensor([21, 22, 23], device=device), inputs.positions[:, -1] + 1


class _HostRead(TorchDispatchMode):
    """Fails on any operator that reads a tensor's value back to the host: a recording on a GPU cannot hold one."""

    READS = frozenset({torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default,
                       torch.ops.aten.nonzero.default, torch.ops.aten.is_nonzero.default, torch.ops.aten.equal.default})

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        assert func not in self.READS, f"the recorded step reads a value back to the host: {func}"
        return func(*args, **(kwargs or {}))


def _no_host_reads(step):
    """The static step, unrecorded, under _HostRead."""
    def replay():
        with _HostRead():
            return step()

    return replay


def _copy(kv: KV) -> KV:
    return KV([k.clone() for k in kv.keys], [v.clone() for v in kv.values], kv.width)


def _step(runner: LlamaRunner, kv: KV, mask: torch.Tensor, ids, positions, slots, start: int = 0) -> torch.Tensor:
    new = torch.zeros(mask.shape[0], 1, dtype=torch.bool, device=mask.device)
    new[slots if slots is not None else slice(0, len(ids))] = True
    with torch.inference_mode():
        return runner.decode(DecodeInputs(ids, kv, torch.cat([mask, new], dim=1), positions, slots=slots,
                                          start=start))


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize(("free_slot_between", "lead"), [(False, 0), (True, 0), (True, 9)])
def test_the_static_step_computes_what_the_eager_step_does(runner, free_slot_between, lead, fused, monkeypatch):
    """Rows of three lengths (so leading masked columns), one behind a prefix, in a cache with free slots after them
    and, in some cases, a free slot between them and columns no row uses in front (the step attends from the bucket
    they start: here 8 of them are skipped): the same hidden states and written keys/values as the eager step; a free
    slot's columns change only in the column the step writes, and stay finite. `fused`: the attention a GPU records
    (torch's fused kernel under the boolean mask), here on the CPU against the eager step written out."""
    monkeypatch.setattr(graphs, "WIDTH_BUCKET", 8)
    kv, mask, ids, positions = _running(runner, slots=5, lead=lead)
    slots = None
    if free_slot_between:  # the rows in slots 0, 2, 3; slot 1 freed
        with torch.inference_mode():
            for t in kv.keys + kv.values:
                t[[0, 2, 3]] = t[[0, 1, 2]].clone()
                t[1] = 7.0  # what a freed slot still holds (finite: its last row's, or zeros)
        mask[[0, 2, 3]] = mask[[0, 1, 2]].clone()
        mask[1] = False
        slots = torch.tensor([0, 2, 3])
    if lead:  # columns before the bucket the rows start in are not attended: NaN there would show
        with torch.inference_mode():
            for t in kv.keys + kv.values:
                t[:, :, :8] = float("nan")
    eager_kv = _copy(kv)
    eager = _step(runner, eager_kv, mask, ids, positions, slots, start=lead)
    before = _copy(kv)
    runner.graphs = graphs.DecodeGraphs(runner, capture=_no_host_reads, after=0)
    runner.graphs.fused = fused
    try:
        static = _step(runner, kv, mask, ids, positions, slots, start=lead)
        assert runner.graphs.replays == 1 and runner.graphs.captures == 1
        assert list(runner.graphs._graphs) == [(8 if lead else 0, min(kv.capacity, 8 * -(-kv.width // 8)))]
    finally:
        runner.graphs = None
    torch.testing.assert_close(static, eager, rtol=0, atol=1e-5)
    assert kv.width == eager_kv.width == before.width + 1
    col = before.width
    used = [0, 1, 2] if slots is None else slots.tolist()
    free = [s for s in range(5) if s not in used]
    for got, want, old in zip(kv.keys + kv.values, eager_kv.keys + eager_kv.values, before.keys + before.values):
        torch.testing.assert_close(got[used, :, : col + 1], want[used, :, : col + 1], rtol=0, atol=1e-5,
                                   equal_nan=True)
        others = [c for c in range(got.shape[2]) if c != col]
        torch.testing.assert_close(got[free][:, :, others], old[free][:, :, others], rtol=0, atol=0, equal_nan=True)
        assert torch.isfinite(got[free, :, col]).all()


def test_graphs_are_captured_once_per_cache_and_width_bucket_after_its_first_steps(runner, monkeypatch):
    """after=1: a cache's first step runs eagerly; then one capture per width bucket, replayed until the width
    passes it; a new cache starts over and the old one's graphs are dropped."""
    monkeypatch.setattr(graphs, "WIDTH_BUCKET", 8)
    recorded: list[int] = []

    def capture(step):
        recorded.append(len(recorded))
        return step

    runner.graphs = dg = graphs.DecodeGraphs(runner, capture=capture, after=1)
    try:
        kv, mask, ids, positions = _running(runner, slots=4)
        assert kv.width == 9 and kv.capacity == 13  # prefix 3 + 6 columns, 4 spare
        for step in range(4):  # attended widths 10, 11, 12, 13 -> buckets 13 (capacity), ... all capped at 13
            _step(runner, kv, mask, ids, positions, None)
            mask = torch.cat([mask, torch.tensor([True, True, True, False])[:, None]], dim=1)
            positions = positions + 1
        assert (dg.replays, dg.captures) == (3, 1)  # step 1 eager; one graph (bucket 16 capped at 13 columns)
        assert list(dg._graphs) == [(0, 13)]

        kv, mask, ids, positions = _running(runner, slots=4)  # a new cache: counted afresh, old graphs dropped
        kv.reserve(10)  # capacity 19 (a new cache again), width 9
        widths = []
        for step in range(9):
            _step(runner, kv, mask, ids, positions, None)
            widths.append(kv.width)
            mask = torch.cat([mask, torch.tensor([True, True, True, False])[:, None]], dim=1)
            positions = positions + 1
        # step 1 eager (width 9 -> 10); steps 2-7 write columns 10..15 (bucket 16); steps 8-9 columns 16, 17 (19)
        assert widths == list(range(10, 19))
        assert (dg.replays, dg.captures) == (3 + 8, 1 + 2)
        assert sorted(dg._graphs) == [(0, 16), (0, 19)]
    finally:
        runner.graphs = None
    assert len(recorded) == 3


def test_a_capture_that_fails_leaves_every_later_step_eager(runner, caplog):
    def failing(step):
        raise RuntimeError("operation not permitted when stream is capturing")

    runner.graphs = dg = graphs.DecodeGraphs(runner, capture=failing, after=0)
    try:
        kv, mask, ids, positions = _running(runner, slots=4)
        expected_kv = _copy(kv)
        with caplog.at_level(logging.WARNING, logger="prompt_server.model.graphs"):
            got = _step(runner, kv, mask, ids, positions, None)
        assert dg.off is not None and "operation not permitted" in dg.off
        assert "a graph failed" in caplog.text
        runner.graphs = None
        want = _step(runner, expected_kv, mask, ids, positions, None)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        runner.graphs = dg
        _step(runner, kv, torch.cat([mask, torch.ones(4, 1, dtype=torch.bool)], dim=1), ids, positions + 1, None)
        assert (dg.replays, dg.captures) == (0, 0)
    finally:
        runner.graphs = None


def test_graphs_are_not_used_off_a_gpu_and_the_loader_says_why(tmp_path):
    loaded = load_model(save_tiny_arch("llama", tmp_path / "m"), device="cpu", progress=False)
    assert not loaded.plan.cuda_graphs
    runner = make_runner(loaded.model, "lean", native=loaded.plan.native_kernels)
    assert isinstance(runner, LlamaRunner)
    assert graphs.supported(runner) == "CUDA graphs need a CUDA device, not cpu"


def test_the_loader_proves_the_recorded_step_or_serves_without_graphs(tmp_path, monkeypatch, caplog):
    """_graphs_plan on a model whose runner could take graphs: the self-check's decode steps run through the recorded
    step and must all be replayed (here the static step unrecorded: the plan takes graphs); a capture that fails (here
    the real one, with no GPU) leaves the plan without them and says why."""
    from prompt_server.model import loader

    loaded = load_model(save_tiny_arch("llama", tmp_path / "m"), device="cpu", progress=False, native_kernels=False)
    monkeypatch.setattr(graphs, "supported", lambda runner: None)
    with caplog.at_level(logging.WARNING, logger="prompt_server.model.loader"):
        failed = loader._graphs_plan(loaded.model, 0, loaded.plan)
    assert failed == loaded.plan and not failed.cuda_graphs
    assert "decode steps run without CUDA graphs" in caplog.text
    monkeypatch.setattr(graphs, "cuda_capture", lambda: graphs.uncaptured)
    assert loader._graphs_plan(loaded.model, 0, loaded.plan).cuda_graphs


def test_a_replay_that_fails_midway_leaves_the_eager_step_exact(runner):
    """A graph that raises after writing some layers' keys/values (an error that leaves the device usable): the eager
    step that follows writes the step's column again, so the result is the eager step's, bit for bit, and the width
    moves by one."""
    kv, mask, ids, positions = _running(runner, slots=4)
    expected_kv = _copy(kv)

    def failing_after_a_write(step):
        def replay():
            for t in kv.keys[:1] + kv.values[:1]:
                t[:, :, kv.width] = 99.0
            raise RuntimeError("graph replay failed")
        return replay

    runner.graphs = dg = graphs.DecodeGraphs(runner, capture=failing_after_a_write, after=0)
    try:
        got = _step(runner, kv, mask, ids, positions, None)
    finally:
        runner.graphs = None
    assert dg.off is not None and "graph replay failed" in dg.off and dg.replays == 0
    want = _step(runner, expected_kv, mask, ids, positions, None)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert kv.width == expected_kv.width
    for a, b in zip(kv.keys + kv.values, expected_kv.keys + expected_kv.values):
        torch.testing.assert_close(a[:3, :, : kv.width], b[:3, :, : kv.width], rtol=0, atol=0)
