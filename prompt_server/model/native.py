"""The server's own CPU kernels (kernels/*.cpp), built with torch's C++ extension loader at start.

- Decode attention (kernels/decode_attention.cpp) is where a batch of long rows spends what the matrix multiplies do
  not: torch's path runs one tiny matrix product per (row, KV head) and reads the cache at about half of memory
  speed; the kernel reads each cached key and value once for the G query heads that share it and skips the columns
  a row's mask drops. On an AVX2 EPYC, 30 layers x 32 rows x 170 columns of the default model: about 26 instead of
  43 ms. Where rows share the keys/values in front of their tokens (one adapter's soft prompt, one cached head), it
  reads them from the one tensor every row's copy came from, so they stay in cache from row to row.
- Projections of a few rows (kernels/linear.cpp) are a read of the weights, which MKL's products run at about half
  of memory speed; the kernel streams each weight once for all rows. The default model's 30 layers at 1-8 rows:
  37-43 instead of 50-82 ms; its vocabulary projection at 1-32 rows 8-22 instead of 10-29 ms (scripts/linear_ab.py).
- A prefill's prefix columns (kernels/layout.cpp): each row's soft prompt and cached head copied into the rows' new
  cache, one call per layer on torch's thread pool instead of one indexed copy per row, piece and layer. 31 rows
  behind 100 + 14 columns of the default model: 14 instead of 33 ms.

The build takes about 20 s once per machine (g++ and ninja; the `ninja` package brings the latter) and is kept under
the cache directory, keyed by the sources, the compiler flags and torch's version. Without a compiler, or if the
build fails, the loader logs why and the model is served with torch's kernels; whichever it is, the start-up
self-check proves the forward that uses them.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

SOURCES = [Path(__file__).with_name("kernels") / name for name in ("decode_attention.cpp", "linear.cpp", "layout.cpp")]
NAMESPACE = "prompt_server_native"


@dataclass(frozen=True)
class Kernels:
    """The built operators."""

    # (q [n, KV, G, D], keys, values, rows [n] long, keep [slots, W] bool, start, scale) -> [n, KV, G, D]
    decode_attention: Callable[..., torch.Tensor]
    # (x [M, K], w [N, K], bias [N] or None) -> [M, N]; every tensor contiguous float32, K a multiple of 8
    linear: Callable[..., torch.Tensor]
    # (out [2, slots, KV, C, D], pieces [L, 2, KV, P, D] each, rows, columns, fill, layer): a prefill's prefix columns
    # copied into the rows' new cache (model/batch.py's PrefillInputs.layer_cache)
    layout: Callable[..., None]


_LOCK = threading.Lock()
_LOADED: Kernels | None = None
_FAILED: str | None = None


def supported(model: Any) -> str | None:
    """Why the kernels cannot serve this model's lean forward, or None."""
    weight = next(model.parameters())
    if weight.device.type != "cpu" or weight.dtype != torch.float32:
        return f"the kernels are for float32 on the CPU, not {weight.dtype} on {weight.device.type}"
    attn = model.model.layers[0].self_attn
    if attn.head_dim % 8:
        return f"the attention kernel needs a head size that is a multiple of 8, not {attn.head_dim}"
    return None


def _flags() -> list[str]:
    flags = ["-O3", "-fopenmp"]  # OpenMP: at::parallel_for runs on torch's own thread pool
    # the vector code for the CPU torch dispatches to; other CPUs get the compiler's portable lowering
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        flags += ["-mavx2", "-mfma"]
    return flags


def load(cache_dir: Path) -> Kernels:
    """The built kernels (building them under cache_dir/kernels the first time); raises with the reason if they cannot
    be built. One build serves the whole process."""
    global _LOADED, _FAILED
    with _LOCK:
        if _LOADED is not None:
            return _LOADED
        if _FAILED is not None:
            raise RuntimeError(_FAILED)
        try:
            _LOADED = _build(cache_dir)
        except Exception as exc:
            _FAILED = f"the kernels could not be built: {type(exc).__name__}: {str(exc)[-400:]}"
            raise RuntimeError(_FAILED) from exc
        return _LOADED


def built() -> Kernels:
    """The kernels load() built; what a runner calls once the loader has proven them."""
    if _LOADED is None:
        raise RuntimeError("the kernels have not been built (model/loader.py builds them)")
    return _LOADED


def _build(cache_dir: Path) -> Kernels:
    from torch.utils import cpp_extension

    flags = _flags()
    sources = b"".join(source.read_bytes() for source in SOURCES)
    key = hashlib.sha256(sources + " ".join(flags).encode() + torch.__version__.encode()).hexdigest()
    name = f"prompt_server_native_{key[:16]}"
    build = Path(cache_dir) / "kernels" / name
    build.mkdir(parents=True, exist_ok=True)
    if shutil.which("ninja") is None:  # torch's loader runs `ninja` from PATH; the ninja package ships one
        import ninja

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    cpp_extension.load(name=name, sources=[str(source) for source in SOURCES], extra_cflags=flags,
                       build_directory=str(build), is_python_module=False, verbose=False)
    log.info("CPU kernels ready (%s)", build)
    ops = getattr(torch.ops, NAMESPACE)
    return Kernels(decode_attention=ops.decode_attention, linear=ops.linear, layout=ops.layout)


if __name__ == "__main__":  # `python -m prompt_server.model.native`: build the kernels into the settings' cache dir
    from prompt_server.config import Settings

    logging.basicConfig(level=logging.INFO)
    load(Settings().cache_dir)
