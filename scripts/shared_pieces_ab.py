"""Rows on one adapter, in process, side by side: 32 requests x 32 tokens all on one prompt-tuning adapter of 100
virtual tokens, the CPU decode kernel reading the shared soft prompt where every row's copy came from (the default,
Runner.reads_pieces) or each row's copy; and the same requests without adapter, for reference. The default model,
float32; the three alternate within each round (order reversed every other round); medians.

    .venv/bin/python scripts/shared_pieces_ab.py [--rounds 5] [--virtual-tokens 100]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prompt_server.config import Settings
from prompt_server.engine.engine import Engine
from prompt_server.model.loader import load_model
from prompt_server.model.memory import keep_freed_memory
from prompt_server_bench.bench import _engine_all, make_prompts, registry_of, write_adapters

ROWS, NEW_TOKENS = 32, 32


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--virtual-tokens", type=int, default=100)
    args = parser.parse_args()
    keep_freed_memory()
    torch.set_grad_enabled(False)
    loaded = load_model(None, device="cpu", progress=False)
    prompts = make_prompts(ROWS)
    rates: dict[str, list[float]] = {"shared": [], "copies": [], "none": []}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        adapters = write_adapters(loaded.model, root, 1, args.virtual_tokens)  # prompt tuning
        [(adapter_id, _)] = adapters
        registry = registry_of(loaded, root, adapters, args.virtual_tokens)
        # prefix caching off: the rounds repeat the same prompts
        engine = Engine(loaded, registry, Settings(max_batch_size=ROWS, prefix_cache_bytes=0))
        engine.start()
        if not engine.runner.reads_pieces:
            print("the CPU decode kernel is not in use here: nothing to compare", file=sys.stderr)
            return 1
        asyncio.run(_engine_all(engine, prompts, [adapter_id] * ROWS, 2))  # the soft prompt's keys/values computed
        asyncio.run(_engine_all(engine, prompts, [None] * ROWS, 2))
        for r in range(args.rounds):
            for mode in ("shared", "copies", "none")[:: 1 if r % 2 == 0 else -1]:
                engine.runner.reads_pieces = mode == "shared"
                ids = [None if mode == "none" else adapter_id] * ROWS
                rates[mode].append(asyncio.run(_engine_all(engine, prompts, ids, NEW_TOKENS)))
                print(f"round {r + 1} {mode}: {rates[mode][-1]:.1f} tok/s", file=sys.stderr)
        engine.stop()
    med = {m: statistics.median(v) for m, v in rates.items()}
    print(f"\n{ROWS} requests x {NEW_TOKENS} tokens, one adapter of {args.virtual_tokens} virtual tokens, "
          f"{torch.get_num_threads()} threads, median of {args.rounds} rounds\n")
    print("| decode reads the soft prompt | tokens/s | / no adapter |")
    print("|---|---:|---:|")
    for mode, what in (("shared", "where it was copied from (one tensor)"), ("copies", "from each row's copy"),
                       ("none", "(no adapter)")):
        print(f"| {what} | {med[mode]:.1f} | {med[mode] / med['none']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
