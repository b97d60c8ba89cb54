"""What an adapter's virtual tokens cost a decode step, against what the same number of prompt tokens costs, in
process, side by side: 32 requests x 32 tokens, each on a different adapter of V virtual tokens (the five kinds
mixed, as `prompt-server bench` mode d); the same prompts without adapter; and without adapter with V more prompt
tokens in front of each (random ids, a different head per row, so that each row's cache holds V more columns of its
own, as each adapter row's does). The default model, float32, prefix caching off (the rounds repeat the prompts);
the three alternate within each round (order reversed every other round). Reported per series: the median decode
step (steps without newcomers) and tokens/s, medians over the rounds, and the ratios round by round.

    .venv/bin/python scripts/longer_rows_ab.py [--rounds 6] [--virtual-tokens 100]

If the adapter rows' decode steps take what the longer prompts' take, the adapters cost nothing beyond their length:
what remains between them and the plain prompts is attending to V more columns, which any server pays for rows V
tokens longer. (Tokens/s also counts the prefills, where the longer prompts run V more tokens through the model and
the adapter rows do not.)
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
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
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--virtual-tokens", type=int, default=100)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    keep_freed_memory()
    prompts = make_prompts(ROWS)
    loaded = load_model(None, device="cpu", progress=False)
    gen = torch.Generator().manual_seed(0)
    vocab = loaded.tokenizer.vocab_size
    longer = [torch.randint(vocab // 20, vocab // 2, (args.virtual_tokens,), generator=gen).tolist()
              + loaded.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    steps: dict[str, list[float]] = {"adapters": [], "none": [], "longer": []}
    rates: dict[str, list[float]] = {m: [] for m in steps}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        written = write_adapters(loaded.model, root, ROWS, args.virtual_tokens)
        adapters = [a for a, _ in written]
        engine = Engine(loaded, registry_of(loaded, root, written, args.virtual_tokens),
                        Settings(max_batch_size=ROWS, prefix_cache_bytes=0))
        timed: list[tuple[float, bool]] = []
        step = engine.runner.step

        def timed_step(decode, groups):
            start = time.perf_counter()
            out = step(decode, groups)
            timed.append((time.perf_counter() - start, decode is not None and not groups))
            return out

        engine.runner.step = timed_step  # type: ignore[method-assign]
        engine.start()
        series = {"adapters": (prompts, adapters), "none": (prompts, [None] * ROWS),
                  "longer": (longer, [None] * ROWS)}
        for ps, ids in series.values():  # every adapter's keys/values computed; first-call costs paid
            asyncio.run(_engine_all(engine, ps, ids, 2))
        for r in range(args.rounds):
            for mode in list(series)[:: 1 if r % 2 == 0 else -1]:
                ps, ids = series[mode]
                timed.clear()
                rates[mode].append(asyncio.run(_engine_all(engine, ps, ids, NEW_TOKENS)))
                steps[mode].append(statistics.median(t for t, decode_only in timed if decode_only))
                print(f"round {r + 1} {mode}: {rates[mode][-1]:.1f} tok/s, decode step p50 "
                      f"{1e3 * steps[mode][-1]:.1f} ms", file=sys.stderr)
        engine.stop()

    def per_round(a: str, b: str) -> str:
        ratios = [x / y for x, y in zip(steps[a], steps[b])]
        return f"{', '.join(f'{x:.2f}' for x in ratios)} (median {statistics.median(ratios):.2f})"

    print(f"\n{ROWS} requests x {NEW_TOKENS} tokens, {args.virtual_tokens} virtual tokens per adapter, "
          f"{torch.get_num_threads()} threads, medians of {args.rounds} rounds\n")
    print("| series | decode step p50 | tokens/s |")
    print("|---|---:|---:|")
    for mode, what in (("adapters", f"every request a different adapter of {args.virtual_tokens} virtual tokens"),
                       ("none", "no adapter"),
                       ("longer", f"no adapter, {args.virtual_tokens} more prompt tokens per request")):
        print(f"| {what} | {1e3 * statistics.median(steps[mode]):.1f} ms | {statistics.median(rates[mode]):.1f} |")
    print(f"\ndecode step, adapters / longer prompts, per round: {per_round('adapters', 'longer')}")
    print(f"decode step, adapters / no adapter, per round: {per_round('adapters', 'none')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
