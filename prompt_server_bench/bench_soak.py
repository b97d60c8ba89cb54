"""Soak: mixed load with adapters replaced while it runs; does memory stay where it was after warm-up?

    prompt-server bench --soak SECONDS [--model DIR] [--clients 16] [--virtual-tokens 20]

Clients send greedy requests, each on a random adapter (every soft-prompt kind) or none, most sharing a chat-like
head, while one adapter after another is replaced by new weights (a new version). After a warm-up (every adapter
used, the caches filled) resident memory is read, and again at the end. The soft-prompt and prefix caches are
LRU-bounded; anything that grows with the number of requests or versions would show here.
"""

from __future__ import annotations

import asyncio
import collections
import random
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

HEAD = "You are a helpful assistant. Answer in one short sentence. Question: "
QUESTIONS = ["why is the sky blue?", "what is a comet?", "how do bees make honey?", "what is jazz?",
             "where is Paris?", "what does a volcano do?"]


@dataclass
class SoakResult:
    outcomes: collections.Counter = field(default_factory=collections.Counter)
    replaced: int = 0
    rss_after_warmup: int = 0
    rss_end: int = 0
    max_prompt_kv_bytes: float = 0.0
    max_prefix_bytes: float = 0.0
    stats: dict = field(default_factory=dict)

    @property
    def growth(self) -> float:
        return self.rss_end / self.rss_after_warmup - 1.0


def run_soak(engine, registry, adapter_dirs: dict[str, Path], seconds: float, clients: int,
             new_tokens: int = 12, seed: int = 0) -> SoakResult:
    """Drive `engine` for `seconds` (after a warm-up pass), replacing adapters from `adapter_dirs` as it goes."""
    from prompt_server.engine.types import EngineError, GenerateRequest

    rng = random.Random(seed)
    ids = list(adapter_dirs)
    result = SoakResult()
    process = psutil.Process()

    def files(path: Path) -> dict[str, bytes]:
        return {f.name: f.read_bytes() for f in path.iterdir() if f.is_file()}

    async def one(adapter_id: str | None, prompt: str) -> str:
        req = GenerateRequest(prompt=prompt, adapter_id=adapter_id, max_new_tokens=rng.randint(2, new_tokens),
                              ignore_eos=True)
        try:
            await engine.submit(req).result()
            return "ok"
        except EngineError as exc:  # counted by kind; the soak goes on
            return type(exc).__name__

    def sample() -> None:
        stats = engine.stats()
        result.max_prompt_kv_bytes = max(result.max_prompt_kv_bytes, stats.get("prompt_kv_bytes", 0.0))
        result.max_prefix_bytes = max(result.max_prefix_bytes, stats.get("prefix_cache_bytes", 0.0))

    async def drive(deadline: float) -> None:
        async def client() -> None:
            while time.monotonic() < deadline:
                adapter_id = rng.choice(ids + [None])
                head = HEAD if rng.random() < 0.8 else f"({rng.randint(0, 10**6)}) "
                result.outcomes[await one(adapter_id, head + rng.choice(QUESTIONS))] += 1
                sample()

        async def replacer() -> None:
            while time.monotonic() < deadline:
                await asyncio.sleep(0.5)
                target, source = rng.choice(ids), rng.choice(ids)
                if registry.get(target).peft_type == registry.get(source).peft_type:
                    registry.put(target, files(adapter_dirs[source]))  # same kind, other weights: a new version
                    result.replaced += 1

        await asyncio.gather(replacer(), *(client() for _ in range(clients)))

    async def warm_up() -> None:
        for adapter_id in ids:  # every adapter once, then the caches see full load
            await one(adapter_id, HEAD + QUESTIONS[0])
        await drive(time.monotonic() + max(5.0, seconds * 0.1))

    asyncio.run(warm_up())
    result.outcomes.clear()
    result.rss_after_warmup = process.memory_info().rss
    asyncio.run(drive(time.monotonic() + seconds))
    result.rss_end = process.memory_info().rss
    result.stats = engine.stats()
    return result


def main_soak(args) -> int:
    """`prompt-server bench --soak SECONDS`: the soak on the default model (or --model), and its report."""
    from prompt_server.config import Settings
    from prompt_server.engine.engine import Engine
    from prompt_server.model.loader import load_model
    from prompt_server.model.memory import keep_freed_memory
    from prompt_server_bench.bench import registry_of, write_adapters

    keep_freed_memory()  # as the server does (model/memory.py): resident memory is measured as it would be served
    loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        made = write_adapters(loaded.model, root, max(args.clients, 5), args.virtual_tokens)
        registry = registry_of(loaded, root, made, args.virtual_tokens)
        dirs = {adapter_id: root / adapter_id for adapter_id, _ in made}
        # budgets small enough that both caches evict during the run
        settings = Settings(max_batch_size=args.clients, prompt_kv_cache_bytes=32 << 20, prefix_cache_bytes=32 << 20)
        engine = Engine(loaded, registry, settings)
        engine.start()
        try:
            result = run_soak(engine, registry, dirs, args.soak, args.clients)
        finally:
            engine.stop()
    mib = 1 << 20
    print(f"\nsoak: {args.soak:.0f} s after warm-up, {args.clients} clients, {len(dirs)} adapters "
          f"({args.virtual_tokens} virtual tokens), {result.replaced} replacements, {loaded.device} {args.dtype}")
    print(f"requests by outcome: {dict(result.outcomes)}")
    print(f"resident memory: {result.rss_after_warmup / mib:.0f} MiB after warm-up, {result.rss_end / mib:.0f} MiB "
          f"at the end ({result.growth:+.1%})")
    print(f"cache bytes at most: soft prompts {result.max_prompt_kv_bytes / mib:.1f} MiB, prefixes "
          f"{result.max_prefix_bytes / mib:.1f} MiB (budgets 32 MiB each); evictions: soft prompts "
          f"{result.stats.get('prompt_kv_evictions', 0):.0f}, prefixes {result.stats.get('prefix_cache_evictions', 0):.0f}")
    return 0 if abs(result.growth) <= 0.10 and set(result.outcomes) <= {"ok"} else 1
