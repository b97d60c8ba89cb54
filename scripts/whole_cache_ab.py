"""A prefill's cache allocated for all layers at once (LlamaRunner.whole_cache, the default off the CPU) against
layer by layer (the CPU's), in process, side by side: closed-loop clients, each request on a different adapter of
every kind (soft prompts and prefixes of --virtual-tokens) or on none, prefix caching on with prompts that share
their head but never repeat. The four series alternate within each round (order reversed every other round);
medians, with the seconds the engine spent in steps that ran prompts and in decode-only steps.

On a GPU, where a step is bound by launching kernels, this measures what copying each soft prompt and cached head
once for all layers saves against one copy per layer:

    python scripts/whole_cache_ab.py --model DIR --device cuda --dtype bfloat16 [--rounds 3]

The forward settings come from the environment as the server's do (PROMPT_SERVER_NATIVE_KERNELS=0: torch's
kernels on the CPU, as on a GPU).
"""

from __future__ import annotations

import argparse
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
from prompt_server.engine.types import GenerateRequest
from prompt_server.model.loader import load_model
from prompt_server.model.memory import keep_freed_memory
from prompt_server_bench.bench import make_prompts, registry_of, write_adapters

SERIES = ("adapters, all layers at once", "adapters, layer by layer", "none, all layers at once",
          "none, layer by layer")
STEP_STATS = ("prefill_step_seconds", "decode_only_step_seconds")


async def closed_loop(engine: Engine, prompts: list[str], adapter_ids: list[str | None], new_tokens: int,
                      clients: int) -> float:
    """`clients` callers, each sending its next request when the last one is done; -> tokens/s."""
    work = iter(zip(prompts, adapter_ids))

    async def client() -> int:
        tokens = 0
        for prompt, adapter_id in work:
            result = await engine.submit(GenerateRequest(prompt=prompt, adapter_id=adapter_id,
                                                         max_new_tokens=new_tokens, ignore_eos=True)).result()
            tokens += len(result.tokens)
        return tokens

    start = time.perf_counter()
    tokens = sum(await asyncio.gather(*(client() for _ in range(clients))))
    return tokens / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model directory (default: the embedded default model)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=128, help="requests per series and round")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--virtual-tokens", type=int, default=100)
    args = parser.parse_args()
    keep_freed_memory()
    torch.set_grad_enabled(False)
    settings = Settings()  # the forward settings from the environment, as the server reads them
    loaded = load_model(args.model, device=args.device, dtype=args.dtype, progress=False,
                        native_kernels=settings.native_kernels, cuda_graphs=settings.cuda_graphs)
    fresh = (f"{p} (take {i})" for i in itertools.count() for p in make_prompts(args.requests))
    rates: dict[str, list[float]] = {s: [] for s in SERIES}
    seconds: dict[str, list[tuple[float, float]]] = {s: [] for s in SERIES}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        adapters = write_adapters(loaded.model, root, args.clients, args.virtual_tokens)
        registry = registry_of(loaded, root, adapters, args.virtual_tokens)
        engine = Engine(loaded, registry, Settings(max_batch_size=args.clients))
        engine.start()
        if not hasattr(engine.runner, "whole_cache"):
            print(f"the {loaded.plan.forward_path} forward path has no such choice: nothing to compare",
                  file=sys.stderr)
            return 1
        by_request = [a for a, _ in itertools.islice(itertools.cycle(adapters), args.requests)]
        for adapter_ids in (by_request, [None] * args.requests):  # soft prompts computed, shapes met once
            asyncio.run(closed_loop(engine, [next(fresh) for _ in range(args.requests)], adapter_ids, 4,
                                    args.clients))
        for r in range(args.rounds):
            for series in SERIES[:: 1 if r % 2 == 0 else -1]:
                engine.runner.whole_cache = "at once" in series
                ids = by_request if series.startswith("adapters") else [None] * args.requests
                before = engine.stats()
                rate = asyncio.run(closed_loop(engine, [next(fresh) for _ in range(args.requests)], ids,
                                               args.new_tokens, args.clients))
                after = engine.stats()
                pre, dec = (after[k] - before[k] for k in STEP_STATS)
                rates[series].append(rate)
                seconds[series].append((pre, dec))
                print(f"round {r + 1} {series}: {rate:.1f} tok/s, steps that ran prompts {pre:.2f} s, "
                      f"decode-only steps {dec:.2f} s", file=sys.stderr)
        engine.stop()
    med = {s: statistics.median(v) for s, v in rates.items()}
    print(f"\n{args.requests} requests x {args.new_tokens} tokens per series and round, {args.clients} clients, "
          f"adapters of {args.virtual_tokens} virtual tokens, {loaded.device} {args.dtype}, median of {args.rounds} "
          f"rounds\n")
    print("| series | tokens/s | steps that ran prompts, s | decode-only steps, s |")
    print("|---|---:|---:|---:|")
    for s in SERIES:
        pre = statistics.median(p for p, _ in seconds[s])
        dec = statistics.median(d for _, d in seconds[s])
        print(f"| {s} | {med[s]:.1f} | {pre:.2f} | {dec:.2f} |")
    print()
    for how in ("all layers at once", "layer by layer"):
        print(f"adapters / none, {how}: {med[f'adapters, {how}'] / med[f'none, {how}']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
