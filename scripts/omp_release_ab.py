"""Engine steps with and without releasing the starting thread's OpenMP workers (model/omp.py), in process: 32
requests x 32 tokens with no adapter, then each on a different adapter of 20 virtual tokens, three rounds; run it
alternately with `on` and `off` (one process each, since a released pool cannot be brought back).

    .venv/bin/python scripts/omp_release_ab.py on|off

Reported per series: tokens/s, the median decode step (steps without newcomers) and the median time from one decode
step's start to the next (the step, its logits and handing out the tokens), round by round.
"""

from __future__ import annotations

import asyncio
import itertools
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prompt_server.config import Settings
from prompt_server.engine.engine import Engine
from prompt_server.model import omp
from prompt_server.model.loader import load_model
from prompt_server.model.memory import keep_freed_memory
from prompt_server_bench.bench import _engine_all, make_prompts, registry_of, write_adapters

ROWS, NEW_TOKENS, VIRTUAL, ROUNDS = 32, 32, 20, 3


def main() -> int:
    if sys.argv[1:] not in (["on"], ["off"]):
        sys.exit(__doc__)
    if sys.argv[1] == "off":
        omp.release = lambda: False  # type: ignore[assignment]
    torch.set_grad_enabled(False)
    keep_freed_memory()
    prompts = make_prompts(ROWS)
    loaded = load_model(None, device="cpu", progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        written = write_adapters(loaded.model, root, ROWS, VIRTUAL)
        adapters = [a for a, _ in written]
        engine = Engine(loaded, registry_of(loaded, root, written, VIRTUAL),
                        Settings(max_batch_size=ROWS, prefix_cache_bytes=0))
        timed: list[tuple[float, float, bool]] = []
        step = engine.runner.step

        def timed_step(decode, groups):
            start = time.perf_counter()
            out = step(decode, groups)
            timed.append((start, time.perf_counter() - start, decode is not None and not groups))
            return out

        engine.runner.step = timed_step  # type: ignore[method-assign]
        engine.start()  # loads on this thread, steps on the engine's: `on` releases this thread's workers here
        series = {"none": [None] * ROWS, "adapters": adapters}
        for ids in series.values():
            asyncio.run(_engine_all(engine, prompts, ids, 2))
        for name, ids in series.items():
            rates, steps, periods = [], [], []
            for _ in range(ROUNDS):
                timed.clear()
                rates.append(asyncio.run(_engine_all(engine, prompts, ids, NEW_TOKENS)))
                decode = [(start, took) for start, took, only in timed if only]
                steps.append(statistics.median(took for _, took in decode))
                periods.append(statistics.median(b[0] - a[0] for a, b in itertools.pairwise(decode)))
            print(f"{sys.argv[1]} {name}: tokens/s {', '.join(f'{r:.1f}' for r in rates)}; decode step p50 "
                  f"{', '.join(f'{1e3 * s:.0f}' for s in steps)} ms; step to step p50 "
                  f"{', '.join(f'{1e3 * p:.0f}' for p in periods)} ms")
        engine.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
