"""The lean path's decode step as a CUDA graph, on a GPU: static shapes per cache and bucket of columns.

On a GPU a small model's decode step is bound by launching its kernels (about 20 per layer), not by running them. A
CUDA graph records one step's kernels once and replays them with a single launch. A graph fixes every shape and
address it was recorded with, so the step it records is written for that:

- every slot of the running batch's cache takes part (free slots see only the column they write, so they stay
  finite; their outputs are dropped), so the shapes are the cache's slot count, which grows by doubling
  (engine/batch.py grown_slots): that is the batch-size bucket;
- attention runs over the columns from the first one a row uses to the step's, each end rounded out to a multiple
  of WIDTH_BUCKET, under the step's mask (a row's columns outside its own are masked), so a graph serves every step
  until the width passes its bucket or the rows that used the first columns have left;
- the step's token ids, positions, mask and column are copied into buffers the graph reads, and the new keys and
  values are written at that column by index (`index_copy_` with a tensor index), so nothing about a step is baked
  into the graph but the cache it writes.

The graphs of one cache are dropped when the batch's cache is replaced (rows joined through a new cache, or the
columns ran out): they hold its addresses. A cache's first DECODE_STEPS_BEFORE_CAPTURE steps run eagerly, so caches
that live for a step or two (waves of arrivals) do not pay a capture (an eager run, then the recording) each.

Steps with newcomers (prefill parts beside the decode) run eagerly, as on the CPU. A recording or a replay that fails
turns graphs off for the rest of the process (logged); that step and every later one run eagerly, which is exact: the
eager step writes the step's column again. `capture` is injectable: the tests run the same static step without
recording it, on the CPU, against the eager step and PEFT.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from prompt_server.model.forward import run_layers

if TYPE_CHECKING:
    from prompt_server.model.batch import KV
    from prompt_server.model.forward import DecodeInputs, LlamaRunner

log = logging.getLogger(__name__)

# The attended columns' ends are rounded out to multiples of this: one graph per bucket. Larger buckets capture less
# often (every WIDTH_BUCKET steps of a long generation) and attend over more masked columns.
WIDTH_BUCKET = 64
# Eager decode steps a cache serves before its steps are captured: a capture costs an eager run and the recording.
DECODE_STEPS_BEFORE_CAPTURE = 1

# capture(step) -> replay: runs `step` once (or records it) and returns a function that runs it again and returns
# its output [slots, hidden]
Capture = Callable[[Callable[[], torch.Tensor]], Callable[[], torch.Tensor]]


def supported(runner: LlamaRunner) -> str | None:
    """Why the runner's decode step cannot be captured, or None."""
    device = runner.embed_tokens.weight.device
    if device.type != "cuda":
        return f"CUDA graphs need a CUDA device, not {device.type}"
    if runner.compiled is not None or runner.decode_kernel is not None:
        return "the compiled layers and the CPU kernels run their own decode step"
    rope = str(getattr(runner.rotary, "rope_type", ""))
    if "dynamic" in rope or "longrope" in rope:
        return f"{rope} rotary scaling may read the positions on the host every step"
    return None


def cuda_capture() -> Capture:
    """Recording on the GPU, on a stream of its own: one run there first (lazy initialisation, cuBLAS's workspace for
    that stream) outside the graph, then the recording, into a memory pool shared by the graphs this capture records
    (one cache's: they never run at once, and each one's output is kept with it); the pool is freed with the last of
    them. A recording that fails leaves the allocator and the thread's current stream as they were."""
    pool = torch.cuda.graph_pool_handle()
    stream = torch.cuda.Stream()
    device = torch.cuda.current_device()

    def capture(step: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        stream.wait_stream(torch.cuda.current_stream())
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(stream):
            step()
            # CUDAGraph's own calls rather than torch.cuda.graph, which synchronizes and empties the allocator's cache
            # before every recording (one per cache and width bucket here) and, when the recording fails, stops before
            # handing back the pool and the thread's stream. thread_local: the API threads' own CUDA work (an adapter
            # upload moving its tensors to the GPU) neither fails nor breaks the recording; it runs on other streams.
            try:
                graph.capture_begin(pool=pool, capture_error_mode="thread_local")
            except RuntimeError:
                _end_pool(device, pool)
                raise
            try:
                out = step()
            finally:
                try:
                    graph.capture_end()
                except RuntimeError:
                    _end_pool(device, pool)
                    raise
        torch.cuda.current_stream().wait_stream(stream)

        def replay() -> torch.Tensor:
            graph.replay()
            return out

        return replay

    return capture


def _end_pool(device: int, pool: tuple[int, int]) -> None:
    """After a recording whose begin or end failed: stop routing allocations to its pool and drop its hold on it (a
    graph whose capture did not end never releases its pool). Where the begin or end got part of the way, the
    allocator refuses the half already done, which is fine. Not after an end that succeeded: the graph releases its
    pool itself when it goes, and a second release would break the allocator's count."""
    for undo in (torch._C._cuda_endAllocateToPool, torch._C._cuda_releasePool):
        try:
            undo(device, pool)
        except RuntimeError:
            pass


def uncaptured(step: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    """The static step run as it is, every time (no device needed)."""
    return step


class DecodeGraphs:
    """Decode steps by graphs captured per (cache, bucket of columns); `decode` returns None when a step runs
    eagerly."""

    def __init__(self, runner: LlamaRunner, capture: Capture | None = None, after: int = DECODE_STEPS_BEFORE_CAPTURE):
        self.runner = runner
        self._capture = capture  # None: cuda_capture(), one per cache
        self._cache_capture: Capture | None = None
        self.after = after
        self.off: str | None = None  # why graphs stopped being used (a failed recording or replay)
        self.captures = 0
        self.replays = 0
        self._cache: list[weakref.ref] = []  # the cache the graphs below were captured on, layer by layer
        self._steps = 0  # decode steps that cache has served
        self._graphs: dict[tuple[int, int], Callable[[], torch.Tensor]] = {}  # attended columns -> replay
        self._buffers: _Buffers | None = None
        # the eager step's attention on the same device (_DecodePart): torch's fused kernel on a GPU, written out on
        # the CPU (where the tests run this step)
        self.fused = runner.embed_tokens.weight.device.type != "cpu"

    def decode(self, inputs: DecodeInputs) -> torch.Tensor | None:
        """The running rows' hidden states [n, hidden] after a replayed graph, or None: run this step eagerly."""
        if self.off is not None:
            return None
        kv = inputs.kv
        if kv.width + 1 > kv.capacity:
            return None  # the eager step makes room (a new cache, whose steps are counted afresh)
        if not self._same_cache(kv):
            self._cache = [weakref.ref(t) for t in kv.keys + kv.values]
            self._graphs, self._buffers, self._cache_capture, self._steps = {}, None, None, 0
        self._steps += 1
        if self._steps <= self.after:
            return None
        cols = (inputs.start // WIDTH_BUCKET * WIDTH_BUCKET,
                min(kv.capacity, -(-(kv.width + 1) // WIDTH_BUCKET) * WIDTH_BUCKET))
        try:
            if self._buffers is None:
                self._buffers = _Buffers(kv, self.runner.embed_tokens.weight.device)
            bufs = self._buffers
            bufs.load(inputs)
            replay = self._graphs.get(cols)
            if replay is None:
                replay = self._capture_for(kv, bufs, cols)
                self._graphs[cols] = replay
                self.captures += 1
            out = replay()
            n = inputs.ids.shape[0]
            hidden = out[:n].clone() if inputs.slots is None else out[inputs.slots]
        except Exception as exc:  # noqa: BLE001 -- the eager step is exact: it writes the step's column again
            self.off = f"{type(exc).__name__}: {exc}"
            log.warning("decode steps run without CUDA graphs from now on: a graph failed (%s)", self.off)
            self._graphs, self._buffers, self._cache_capture = {}, None, None
            return None
        self.replays += 1
        kv.width += 1
        return hidden

    def _same_cache(self, kv: KV) -> bool:
        tensors = kv.keys + kv.values
        return len(tensors) == len(self._cache) and all(ref() is t for ref, t in zip(self._cache, tensors))

    def _capture_for(self, kv: KV, bufs: _Buffers, cols: tuple[int, int]) -> Callable[[], torch.Tensor]:
        capture = self._capture
        if capture is None:
            if self._cache_capture is None:
                self._cache_capture = cuda_capture()
            capture = self._cache_capture
        fused = self.fused
        return capture(lambda: _static_step(self.runner, kv, bufs, cols, fused))


class _Buffers:
    """What a step's graph reads, one per cache: token ids, positions, mask and the column written."""

    def __init__(self, kv: KV, device: torch.device):
        slots, capacity = kv.batch_size, kv.capacity
        self.ids = torch.zeros(slots, dtype=torch.long, device=device)
        self.positions = torch.zeros(slots, dtype=torch.long, device=device)
        self.mask = torch.zeros(slots, capacity, dtype=torch.bool, device=device)
        self.column = torch.zeros(1, dtype=torch.long, device=device)

    def load(self, inputs: DecodeInputs) -> None:
        col = inputs.kv.width
        self.ids.zero_()
        self.positions.zero_()
        rows = slice(0, inputs.ids.shape[0]) if inputs.slots is None else inputs.slots
        self.ids[rows] = inputs.ids
        self.positions[rows] = inputs.positions
        self.mask.zero_()
        self.mask[:, : col + 1] = inputs.mask[:, : col + 1]
        self.mask[:, col] = True  # free slots see the column they write, so they stay finite
        self.column.fill_(col)


def _static_step(runner: LlamaRunner, kv: KV, bufs: _Buffers, cols: tuple[int, int], fused: bool) -> torch.Tensor:
    """One token for every slot -> hidden [slots, hidden], attending over columns [lo, hi) of `cols`; shapes depend
    only on the cache and `cols`, and nothing is read back to the host."""
    r, d = runner, runner.head_dim
    x = r.embed_tokens(bufs.ids)  # [S, hidden]
    slots = x.shape[0]
    cos, sin = r.rotary(x, bufs.positions[:, None])  # [S, 1, d]
    lo, hi = cols
    mask = bufs.mask[:, None, None, lo:hi]  # [S, 1, 1, hi - lo]
    bias = None
    if not fused:
        bias = torch.zeros(mask.shape, dtype=x.dtype, device=x.device).masked_fill_(~mask, float("-inf"))

    def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q = q.view(slots, 1, r.n_heads, d).transpose(1, 2)  # [S, H, 1, d]
        k = k.view(slots, 1, r.n_kv, d).transpose(1, 2)  # [S, kv, 1, d]
        q, k = r.apply_rotary(q, k, cos, sin)
        keys, values = kv.keys[layer], kv.values[layer]
        keys.index_copy_(2, bufs.column, k)
        values.index_copy_(2, bufs.column, v.reshape(slots, r.n_kv, 1, d))
        qg = q.reshape(slots, r.n_kv, r.n_heads // r.n_kv, d)  # [S, kv, g, d]: the heads that share a KV head
        keys, values = keys[:, :, lo:hi], values[:, :, lo:hi]
        if bias is not None:
            scores = torch.matmul(qg, keys.transpose(-1, -2)).mul_(r.attn_scale).add_(bias)
            out = torch.matmul(scores.softmax(-1, dtype=torch.float32).to(qg.dtype), values)
        else:
            out = F.scaled_dot_product_attention(qg, keys, values, attn_mask=mask, scale=r.attn_scale)
        return out.reshape(slots, -1)

    return run_layers(r.layers, r.norm, x, attend, r.linear)
