"""Decode attention alone, side by side: torch's written-out attention (what the lean path runs without the kernel)
against the server's CPU kernel (prompt_server/model/native.py), and a plain `sum` over the same keys and values
(what reading them costs on this machine). 30 layers x 32 rows of the default model's cache shape (3 KV heads of 64,
3 query heads per KV head), float32, the batch's slot layout (spare capacity after the used columns); median of 9.

    .venv/bin/python scripts/decode_attention_ab.py [--columns 70,170] [--rows 32] [--shared 100]

The rounds alternate, so that a machine whose speed drifts weighs on each alike. `--shared P`: two more kernel runs,
in which each row's first P columns are read from the keys/values they were copied from (Sequence.shared): one
piece for every row (every request on one adapter) and one piece per row (every request on its own adapter).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prompt_server.config import default_cache_dir
from prompt_server.model import native

LAYERS, KV_HEADS, GROUP, HEAD = 30, 3, 3, 64
SCALE = HEAD ** -0.5


def measure(kernel, width: int, n_rows: int, repeats: int, gen: torch.Generator, shared: int = 0) -> dict[str, float]:
    """Median milliseconds of each over `width` columns of an `n_rows`-row cache, all layers."""
    start, capacity = 4, width + 40
    keys = [torch.randn(n_rows, KV_HEADS, capacity, HEAD, generator=gen) for _ in range(LAYERS)]
    values = [torch.randn(n_rows, KV_HEADS, capacity, HEAD, generator=gen) for _ in range(LAYERS)]
    q = torch.randn(n_rows, KV_HEADS, GROUP, HEAD, generator=gen)
    keep = torch.ones(n_rows, width, dtype=torch.bool)
    bias = torch.zeros(n_rows, 1, 1, width)
    rows = torch.arange(n_rows)
    cols = slice(start, start + width)

    def torch_path():
        for k, v in zip(keys, values):
            scores = torch.matmul(q, k[:, :, cols].transpose(-1, -2)).mul_(SCALE).add_(bias)
            torch.matmul(scores.softmax(-1, dtype=torch.float32), v[:, :, cols])

    def kernel_path():
        for k, v in zip(keys, values):
            kernel(q, k, v, rows, keep, start, SCALE, [], None, 0)

    def read():
        for k, v in zip(keys, values):
            k[:, :, cols].sum()
            v[:, :, cols].sum()

    paths = [("torch", torch_path), ("kernel", kernel_path), ("sum", read)]
    if 0 < shared <= width:
        one = torch.randn(LAYERS, 2, KV_HEADS, shared, HEAD, generator=gen)
        own = [torch.randn(LAYERS, 2, KV_HEADS, shared, HEAD, generator=gen) for _ in range(n_rows)]

        def pieces_path(pieces: list[torch.Tensor], index: torch.Tensor):
            redirect = torch.full((n_rows, 5), -1, dtype=torch.long)
            redirect[:, 0], redirect[:, 1], redirect[:, 2] = start, index, shared

            def run():
                for layer, (k, v) in enumerate(zip(keys, values)):
                    kernel(q, k, v, rows, keep, start, SCALE, pieces, redirect, layer)

            return run

        paths += [("one piece", pieces_path([one], torch.zeros(n_rows, dtype=torch.long))),
                  ("a piece per row", pieces_path(own, torch.arange(n_rows)))]
    times: dict[str, list[float]] = {name: [] for name, _ in paths}
    for _ in range(repeats):
        for name, fn in paths:
            t = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t) * 1000)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--columns", default="70,170", help="cache columns each row attends, comma-separated")
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--shared", type=int, default=0, help="columns read from shared pieces (see above)")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    kernel = native.load(default_cache_dir()).decode_attention
    gen = torch.Generator().manual_seed(0)
    print(f"{LAYERS} layers x {args.rows} rows, {KV_HEADS} KV heads x {GROUP} queries x {HEAD}, float32, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}\n")
    extra = f" | first {args.shared} from one piece | from a piece per row" if args.shared else ""
    print(f"| columns | keys+values MB | torch | kernel | sum (read) | torch / kernel{extra} |")
    print("|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if args.shared else ""))
    for width in (int(c) for c in args.columns.split(",")):
        ms = measure(kernel, width, args.rows, args.repeats, gen, args.shared)
        mb = LAYERS * args.rows * KV_HEADS * width * HEAD * 4 * 2 / 1e6
        more = ""
        if args.shared:
            more = (f" | {ms['one piece']:.1f} ms | {ms['a piece per row']:.1f} ms" if "one piece" in ms
                    else " | - | -")
        print(f"| {width} | {mb:.0f} | {ms['torch']:.1f} ms | {ms['kernel']:.1f} ms | {ms['sum']:.1f} ms | "
              f"{ms['torch'] / ms['kernel']:.2f}{more} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
