"""The lean forward's decoder layers compiled with torch.compile (inductor), on the CPU in float32.

What it buys: with the weights frozen, inductor prepacks every projection and generates its own matrix-multiply
kernels (its C++ GEMM template), which multiply a few rows by a large weight up to twice as fast as MKL on an AVX2
EPYC (the default model's 30 layers of projections: 8 rows 46 instead of 66-87 ms, 16 rows 61-63 instead of 78-84;
about even at 32), and it fuses the norms, residual adds and SiLU-and-multiply between them.

What it costs: minutes of compilation at start on a 2-core machine (most of it Python generating one kernel per
projection; the frozen graph is not cached between processes), and a second, packed copy of the layers' weights.

Attention stays outside the graph: one opaque operator per layer (`prompt_server::attend`) calls back into the step's
parts (slots, prefixes, cached soft prompts, chunked prefill), so what the runner does there is unchanged, and the
graph's one dynamic size is the step's token count: one compilation serves every step.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

import torch

from prompt_server.model.forward import Attend, _linear, run_layers

# Frozen weights are what lets inductor prepack them and use its GEMM template; CPP alone skips benchmarking the
# template against MKL for every projection at start (it won or tied at every row count measured).
INDUCTOR_OPTIONS = {"freezing": True, "max_autotune": True, "max_autotune_gemm_backends": "CPP"}
# The step's token count is the graph's dynamic size; torch specializes sizes 0 and 1, so a step runs at least 2.
MIN_ROWS = 2

_STEP = threading.local()  # the attention of the step in flight on this thread


@torch.library.custom_op("prompt_server::attend", mutates_args=())
def _attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Layer `layer`'s attention for the step in flight: q, k, v [N, *] -> [N, heads * head_dim], q's shape.

    It also writes the step's keys and values into the cache: state the graph does not see, which is why the layers
    are chained through its output and never reordered around it."""
    return _STEP.attend(layer, q, k, v).contiguous()


@_attend.register_fake
def _(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return q.new_empty(q.shape)


class _Layers(torch.nn.Module):
    """The runner's layer loop (forward.run_layers) with plain projections, attention the opaque operator."""

    def __init__(self, layers: torch.nn.ModuleList, norm: torch.nn.Module):
        super().__init__()
        self.layers, self.norm = layers, norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_layers(self.layers, self.norm, x, torch.ops.prompt_server.attend, _linear)


class CompiledLayers:
    """x [N >= MIN_ROWS, hidden] and the step's attention -> final hidden states [N, hidden]."""

    def __init__(self, model: Any):
        self.fn = torch.compile(_Layers(model.model.layers, model.model.norm), dynamic=True)

    def __call__(self, x: torch.Tensor, attend: Attend) -> torch.Tensor:
        _STEP.attend = attend
        try:
            with torch._inductor.config.patch(INDUCTOR_OPTIONS):
                return self.fn(x)
        finally:
            _STEP.attend = None


# One compiled copy per (frozen) model, shared by every runner built on it.
_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def supported(model: Any) -> str | None:
    """Why the model's layers cannot be compiled here, or None."""
    weight = next(model.parameters())
    if weight.device.type != "cpu" or weight.dtype != torch.float32:
        return f"compilation is implemented for float32 on the CPU, not {weight.dtype} on {weight.device.type}"
    return None


def compiled_layers(model: Any) -> CompiledLayers:
    """The model's compiled layers (compiled on first call, then shared)."""
    reason = supported(model)
    if reason:
        raise ValueError(reason)
    if model not in _COMPILED:
        _COMPILED[model] = CompiledLayers(model)
    return _COMPILED[model]
