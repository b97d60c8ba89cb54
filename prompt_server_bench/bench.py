"""Side-by-side throughput benchmark: PEFT, plain HF generate and this engine, on one model and one prompt set.

    prompt-server bench [--model DIR] [--requests 32] [--new-tokens 32] [--virtual-tokens 8] [--rounds 2]
    prompt-server bench --http [--concurrency 1,8,32,64] [--rates 1,2,4] ...   (see prompt_server_bench/bench_http.py)

(`python -m prompt_server_bench ...` is the same command.)

Modes (all greedy, exactly --new-tokens tokens per request):
  a  PEFT, mixed adapters, one request at a time (what PEFT users do today)
  b  PEFT, batched, every request on one prompt-tuning adapter (PEFT's best case)
  c  HF generate, batched, no adapter (the bare model)
  d  this engine, every request on a different adapter, all five kinds mixed
  e  this engine, no adapter
  f  as d, with the soft-prompt cache off (prompt_kv_cache_bytes=0): virtual tokens prefilled with every request
peft writes the benchmark's adapters and runs a and b; --http also plots with matplotlib: both come with the
`bench` extra (pip install -e ".[bench]").
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

VARIANTS = ("prompt_tuning", "p_tuning_mlp", "p_tuning_lstm", "prefix", "prefix_projection")
MODES = {
    "a": "PEFT, mixed adapters, one request at a time",
    "b": "PEFT, batched, one adapter",
    "c": "HF generate, batched, no adapter",
    "d": "prompt-server, every request a different adapter",
    "e": "prompt-server, no adapter",
    "f": "prompt-server, every request a different adapter, virtual tokens re-run per request (no soft-prompt cache)",
}
TOPICS = ["rivers", "bread", "chess", "volcanoes", "jazz", "bicycles", "tea", "comets", "bees", "glass", "maps",
          "clocks"]


# --model random-t5-small: an encoder-decoder model of t5-small's shape (d_model 512, 6 + 6 layers, 8 heads,
# d_ff 2048) with random weights and the default model's tokenizer (49152 tokens), made on the spot.
RANDOM_T5 = "random-t5-small"


def random_t5_small(root: Path) -> Path:
    from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration

    from prompt_server.model.default import ensure_default_model

    tok = AutoTokenizer.from_pretrained(ensure_default_model(None, progress=False))
    config = T5Config(vocab_size=len(tok), d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_decoder_layers=6,
                      num_heads=8, decoder_start_token_id=tok.pad_token_id or 0, pad_token_id=tok.pad_token_id or 0,
                      eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    T5ForConditionalGeneration(config).eval().save_pretrained(root / RANDOM_T5)
    tok.save_pretrained(root / RANDOM_T5)
    return root / RANDOM_T5


def make_prompts(n: int) -> list[str]:
    """Prompts of varied length, as a real mix of requests would be."""
    out = []
    for i in range(n):
        topic = TOPICS[i % len(TOPICS)]
        detail = " Explain it simply, with one example, for a curious reader." * (i % 3)
        out.append(f"Write a short paragraph about {topic} (note {i}).{detail}")
    return out


def peft_config(variant: str, n_virtual: int, task_type: str = "CAUSAL_LM"):
    from peft import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig

    common = {"task_type": task_type, "num_virtual_tokens": n_virtual}
    if variant == "prompt_tuning":
        return PromptTuningConfig(**common)
    if variant.startswith("p_tuning"):
        kind = "MLP" if variant.endswith("mlp") else "LSTM"
        return PromptEncoderConfig(encoder_reparameterization_type=kind, encoder_hidden_size=128, **common)
    return PrefixTuningConfig(prefix_projection=variant == "prefix_projection", encoder_hidden_size=128, **common)


def write_adapters(model, root: Path, n: int, n_virtual: int, prefix: str = "") -> list[tuple[str, str]]:
    """n PEFT adapters cycling through the five kinds, small random encoders, saved with save_pretrained."""
    from peft import get_peft_model

    made = []
    for i in range(n):
        variant = VARIANTS[i % len(VARIANTS)]
        task = "SEQ_2_SEQ_LM" if model.config.is_encoder_decoder else "CAUSAL_LM"
        pm = get_peft_model(model, peft_config(variant, n_virtual, task))
        gen = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for name, p in pm.prompt_encoder["default"].named_parameters():
                std = 0.02 if name.endswith("embedding.weight") else p.shape[-1] ** -0.5 if p.dim() > 1 else 0.0
                p.copy_(torch.randn(p.shape, generator=gen) * std)
        adapter_id = f"{prefix}{variant}-{i}"
        pm.save_pretrained(root / adapter_id)
        pm.base_model.peft_config = {}
        made.append((adapter_id, variant))
        model = pm.get_base_model()
    return made


def registry_of(loaded, root: Path, adapters: list[tuple[str, str]], n_virtual: int):
    """An adapter registry for `loaded`'s model holding `adapters` (write_adapters' ids, saved under `root`)."""
    from prompt_server.adapters.registry import AdapterRegistry

    registry = AdapterRegistry(loaded.spec, device=loaded.device, dtype=loaded.dtype,
                               max_virtual_tokens=max(128, n_virtual))
    for adapter_id, _ in adapters:
        registry.put(adapter_id, {f.name: f.read_bytes() for f in (root / adapter_id).iterdir() if f.is_file()})
    return registry


def run_peft_sequential(model, tok, adapters, prompts, root, new_tokens) -> float:
    from peft import PeftModel

    wrapped = {}
    start = time.perf_counter()
    for i, prompt in enumerate(prompts):
        adapter_id, variant = adapters[i % len(adapters)]
        if variant not in wrapped:
            wrapped[variant] = PeftModel.from_pretrained(model, root / adapter_id, adapter_name=adapter_id)
        pm = wrapped[variant]
        if adapter_id not in pm.peft_config:
            pm.load_adapter(root / adapter_id, adapter_name=adapter_id)
        pm.set_adapter(adapter_id)
        enc = tok(prompt, return_tensors="pt").to(model.device)
        pm.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                    pad_token_id=tok.pad_token_id)
    _sync(model.device)
    elapsed = time.perf_counter() - start
    return len(prompts) * new_tokens / elapsed


def run_hf_batched(model, tok, prompts, new_tokens) -> float:
    # a decoder-only model continues the prompt, so it is padded on the left; an encoder reads it right-padded
    tok.padding_side = "right" if model.config.is_encoder_decoder else "left"
    enc = tok(prompts, return_tensors="pt", padding=True).to(model.device)
    start = time.perf_counter()
    model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                   pad_token_id=tok.pad_token_id)
    _sync(model.device)
    return len(prompts) * new_tokens / (time.perf_counter() - start)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# the engine's counters a round line shows, and how: its decode steps (forward passes with running rows), the running
# batch's cache laid out anew, and on a GPU the decode steps replayed from CUDA graphs and the graphs recorded
# (model/graphs.py; a new cache layout records its graphs again)
STEP_COUNTERS = {"steps": "decode steps", "cache_relayouts": "cache relayouts",
                 "decode_graph_steps": "replayed from CUDA graphs", "decode_graph_captures": "graphs recorded"}


def _step_counts(before: dict, engine) -> str:
    """`, decode steps N, ...`: the STEP_COUNTERS `engine` counted since `before` (its stats() then); empty for HF's
    modes. On a GPU also the device allocations the caching allocator made meanwhile (each cudaMalloc stalls the
    host, which a step bound by launching kernels feels)."""
    if engine is None:
        return ""
    after = engine.stats()
    text = "".join(f", {label} {after[k] - before.get(k, 0):g}" for k, label in STEP_COUNTERS.items() if k in after)
    # where the round's time went (Engine._count_step; a step is counted once it has handed out its tokens, so the
    # round's last one may fall to the next round)
    for kind, label in (("prefill", "prefill steps"), ("decode_only", "decode-only steps")):
        n = after[f"{kind}_steps"] - before.get(f"{kind}_steps", 0)
        seconds = after[f"{kind}_step_seconds"] - before.get(f"{kind}_step_seconds", 0)
        text += f", {label} {n:g} ({seconds:.2f} s)"
    if "device_allocs" in before:
        text += f", device allocations {_device_allocs() - before['device_allocs']:g}"
    return text


def _device_allocs() -> float:
    """Blocks the CUDA caching allocator has taken from the device since the process started."""
    stats = torch.cuda.memory_stats()
    return float(stats.get("num_device_alloc", stats.get("segment.all.allocated", 0)))


async def _engine_all(engine, prompts, adapter_ids, new_tokens) -> float:
    from prompt_server.engine.types import GenerateRequest

    start = time.perf_counter()
    handles = [
        engine.submit(GenerateRequest(prompt=p, adapter_id=a, max_new_tokens=new_tokens, ignore_eos=True))
        for p, a in zip(prompts, adapter_ids)
    ]
    results = await asyncio.gather(*(h.result() for h in handles))
    elapsed = time.perf_counter() - start
    assert all(len(r.tokens) == new_tokens for r in results)
    return len(prompts) * new_tokens / elapsed


def _ints(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t.strip()]


def _floats(text: str) -> list[float]:
    return [float(t) for t in text.split(",") if t.strip()]


def _missing(*modules: str) -> list[str]:
    return [m for m in modules if importlib.util.find_spec(m) is None]


def main(argv: list[str] | None = None, prog: str = "prompt-server bench") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model directory (default: the embedded default model); "
                        f"{RANDOM_T5}: a random encoder-decoder model of t5-small's shape")
    parser.add_argument("--requests", type=int, default=32, help="requests in flight")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--virtual-tokens", type=_ints, default=None,
                        help="virtual tokens / prefix length per adapter (default 8; --http: a list, default 20,100)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="timed rounds per mode (default 2, the median is reported); --http: sweeps of every "
                             "series on both servers, interleaved point by point (default 1, the rounds pooled)")
    parser.add_argument("--modes", default="abcde", help="which modes to run, e.g. 'cde'")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="where every mode runs (--http: both servers)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="every mode's (--http: both servers')")
    parser.add_argument("--http", action="store_true", help="benchmark the HTTP servers instead (see bench_http)")
    parser.add_argument("--soak", type=float, default=0.0, metavar="SECONDS",
                        help="instead: mixed load for SECONDS with adapters replaced as it runs; reports resident "
                             "memory after warm-up and at the end (exit 1 past 10%% growth or on any failure)")
    parser.add_argument("--ttft", type=int, default=0, metavar="N",
                        help="instead: time to first token of N chat requests sharing the chat template's system "
                             "prompt, one at a time, with prefix caching on and off")
    parser.add_argument("--clients", type=int, default=32, help="--soak: concurrent clients")
    http = parser.add_argument_group("--http")
    http.add_argument("--endpoints", type=lambda t: t.split(","), default=["completions", "chat"],
                      help="streamed endpoints to sweep: completions, chat or both (default completions,chat)")
    http.add_argument("--concurrency", type=_ints, default=[1, 8, 32, 64], help="closed-loop clients (default 1,8,32,64)")
    http.add_argument("--rates", type=_floats, default=[1.0, 2.0, 4.0],
                      help="open-loop Poisson arrival rates in requests/s (default 1,2,4; empty for none)")
    http.add_argument("--requests-per-client", type=int, default=2,
                      help="closed loop: requests per client at each concurrency (at least 8 in all)")
    http.add_argument("--open-seconds", type=float, default=16.0,
                      help="open loop: requests sent at each rate = rate x this (at least 8)")
    http.add_argument("--out", default="bench-results", help="folder for bench-http.md, .json and .png")
    http.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                      help="every request generates exactly --new-tokens tokens on both servers (default on)")
    http.add_argument("--transformers-cmd", default="transformers",
                      help="command that runs `transformers serve` (a transformers whose continuous batching runs "
                           "on this device)")
    http.add_argument("--skip-transformers", action="store_true", help="only measure prompt-server")
    args = parser.parse_args(argv)
    # --ttft writes no adapters; everything else does (peft), and --http plots (matplotlib)
    missing = [] if args.ttft else _missing("peft", *(["matplotlib"] if args.http else []))
    if missing:
        parser.exit(2, f"{prog}: needs {' and '.join(missing)}, which the benchmarks' extra installs: "
                       "pip install -e \".[bench]\" (or `make bench`)\n")
    if args.http:
        bad = sorted(set(args.endpoints) - {"completions", "chat"})
        if bad:
            parser.error(f"--endpoints: {', '.join(bad)} is not completions or chat")
        args.virtual_tokens = args.virtual_tokens or [20, 100]
        return _main_http(args)
    if args.virtual_tokens is not None and len(args.virtual_tokens) != 1:
        parser.error("--virtual-tokens takes one number here (a list only with --http)")
    args.virtual_tokens = args.virtual_tokens[0] if args.virtual_tokens else 8
    if args.ttft:
        return _main_ttft(args)
    if args.soak:
        from prompt_server_bench.bench_soak import main_soak

        return main_soak(args)

    from prompt_server.config import Settings
    from prompt_server.engine.engine import Engine
    from prompt_server.model import omp

    torch.set_grad_enabled(False)
    model_dir = random_t5_small(Path(tempfile.mkdtemp())) if args.model == RANDOM_T5 else args.model
    loaded = _load_as_served(args, model_dir)
    model, tok = loaded.model, loaded.tokenizer
    prompts = make_prompts(args.requests)
    rates: dict[str, list[float]] = {m: [] for m in args.modes}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        adapters = write_adapters(model, root, args.requests, args.virtual_tokens)
        # The rounds repeat the same prompts: prefix caching would serve later rounds from the first one's keys and
        # values. It is measured on its own (--ttft), with prompts that really share a head.
        settings = Settings(max_batch_size=max(args.requests, 1), prefix_cache_bytes=0)
        registry = registry_of(loaded, root, adapters, args.virtual_tokens)
        engine = Engine(loaded, registry, settings)
        engine.start()
        inline = None
        if "f" in args.modes:  # a second engine on the same model; the modes run one at a time
            inline = Engine(loaded, registry, settings.model_copy(update={"prompt_kv_cache_bytes": 0}))
            inline.start()
        ids = [a for a, _ in adapters]
        single = [(ids[0], VARIANTS[0])]

        def once(mode: str) -> float:
            if mode in "abc":
                # on this thread; then its OpenMP workers go, which would otherwise slow the engine's (model/omp.py)
                return omp.released(on_this_thread)(mode)
            adapter_ids = [None] * len(prompts) if mode == "e" else ids
            return asyncio.run(_engine_all(inline if mode == "f" else engine, prompts, adapter_ids, args.new_tokens))

        def on_this_thread(mode: str) -> float:
            if mode == "a":
                return run_peft_sequential(model, tok, adapters, prompts, root, args.new_tokens)
            if mode == "b":
                from peft import PeftModel

                pm = PeftModel.from_pretrained(model, root / single[0][0])
                rate = run_hf_batched(pm, tok, prompts, args.new_tokens)
                model.peft_config = {}
                return rate
            return run_hf_batched(model, tok, prompts, args.new_tokens)

        # warm-up: one short pass of each engine/HF path so first-call costs are not measured; every adapter is used
        # once, so its virtual tokens' keys/values are computed before timing (once per adapter version, as in a
        # server that has seen its adapters before)
        # On a GPU the warm-up runs whole requests: the first time a kernel meets a shape (each batch size the
        # running batch passes through, each cache width) costs far more than the kernel itself.
        warm_tokens = args.new_tokens if loaded.device.type == "cuda" else 1
        asyncio.run(_engine_all(engine, prompts, ids, warm_tokens))
        asyncio.run(_engine_all(engine, prompts, [None] * len(prompts), warm_tokens))
        if inline is not None:
            asyncio.run(_engine_all(inline, prompts, ids, warm_tokens) if warm_tokens > 1
                        else _engine_all(inline, prompts[:4], ids[:4], 2))
        omp.released(run_hf_batched)(model, tok, prompts[:4], 2)
        for r in range(args.rounds or 2):
            for mode in args.modes:
                served_by = None if mode in "abc" else inline if mode == "f" else engine
                before = served_by.stats() if served_by is not None else {}
                if served_by is not None and loaded.device.type == "cuda":
                    before["device_allocs"] = _device_allocs()
                rate = once(mode)
                rates[mode].append(rate)
                print(f"round {r + 1} {mode}: {rate:7.1f} tok/s{_step_counts(before, served_by)}", file=sys.stderr)
        engine.stop()
        if inline is not None:
            inline.stop()

    med = {m: statistics.median(v) for m, v in rates.items()}
    lengths = [len(tok(p).input_ids) for p in prompts]
    print(f"\nmodel {loaded.model_id}, {args.requests} requests x {args.new_tokens} new tokens, "
          f"prompts of {min(lengths)}-{max(lengths)} tokens (mean {statistics.mean(lengths):.0f}), "
          f"{args.virtual_tokens} virtual tokens per adapter, {loaded.device} {args.dtype}, "
          f"torch threads {torch.get_num_threads()}, median of {args.rounds or 2} rounds\n")
    print("| mode | what | tokens/s |")
    print("|---|---|---:|")
    for m in args.modes:
        print(f"| {m} | {MODES[m]} | {med[m]:.1f} |")
    print()
    for num, den in (("d", "a"), ("d", "b"), ("d", "c"), ("d", "e"), ("f", "e"), ("d", "f")):
        if num in med and den in med:
            print(f"({num})/({den}) = {med[num] / med[den]:.2f}")
    return 0


QUESTIONS = ["What is the capital of France?", "How do bees make honey?", "Why is the sky blue?",
             "Name three uses of glass.", "What does a volcano do?", "How does a bicycle stay upright?",
             "What is jazz?", "Where do comets come from?"]


async def _first_token_time(engine, prompt: str) -> float:
    from prompt_server.engine.types import GenerateRequest

    req = GenerateRequest(prompt=prompt, max_new_tokens=1, ignore_eos=True, add_special_tokens=False)
    return (await engine.submit(req).result()).first_token_time


def _load_as_served(args, model_dir):
    """The model loaded as the server would serve it: --threads, the allocator setting (model/memory.py), and the
    forward settings from the environment (PROMPT_SERVER_COMPILE=1 measures the compiled layers,
    PROMPT_SERVER_NATIVE_KERNELS=0 torch's decode attention)."""
    from prompt_server.config import Settings
    from prompt_server.model.loader import load_model
    from prompt_server.model.memory import keep_freed_memory

    if args.threads:
        torch.set_num_threads(args.threads)
    keep_freed_memory()
    settings = Settings()
    return load_model(model_dir, device=args.device, dtype=args.dtype, compile=settings.compile,
                      native_kernels=settings.native_kernels, cuda_graphs=settings.cuda_graphs)


def _main_ttft(args) -> int:
    """Time to first token at concurrency 1 for chat requests that share the template's default system prompt."""
    from prompt_server.adapters.registry import AdapterRegistry
    from prompt_server.config import Settings
    from prompt_server.engine.engine import Engine

    loaded = _load_as_served(args, args.model)
    tok = loaded.tokenizer
    prompts = [tok.apply_chat_template([{"role": "user", "content": f"{QUESTIONS[i % len(QUESTIONS)]} ({i})"}],
                                       tokenize=False, add_generation_prompt=True) for i in range(args.ttft)]
    registry = AdapterRegistry(loaded.spec, device=loaded.device, dtype=loaded.dtype)
    results = {}
    for label, budget in (("off", 0), ("on", Settings().prefix_cache_bytes)):
        engine = Engine(loaded, registry, Settings(prefix_cache_bytes=budget))
        engine.start()

        asyncio.run(_first_token_time(engine, "warm-up: " + prompts[0]))
        results[label] = [asyncio.run(_first_token_time(engine, p)) for p in prompts]
        engine.stop()
    lengths = [len(tok(p, add_special_tokens=False).input_ids) for p in prompts]
    print(f"\nmodel {loaded.model_id}, {args.ttft} chat requests one at a time, prompts of {min(lengths)}-"
          f"{max(lengths)} tokens sharing the chat template's system prompt, {loaded.device} {args.dtype}\n")
    print("| prefix caching | time to first token p50 | p90 |")
    print("|---|---:|---:|")
    for label, times in results.items():
        q = statistics.quantiles(times, n=10)
        print(f"| {label} | {statistics.median(times) * 1000:.1f} ms | {q[8] * 1000:.1f} ms |")
    print(f"\np50 on/off = {statistics.median(results['on']) / statistics.median(results['off']):.2f}")
    return 0


def _main_http(args) -> int:
    import platform

    from prompt_server.model.loader import load_model
    from prompt_server_bench.bench_http import prompts_needed, report, run_http

    loaded = load_model(args.model, device="cpu", dtype="float32")
    count = max(max(args.concurrency, default=1), 5)  # every request in flight on a different adapter
    # every prompt different (its number), so that no series is sent one twice; prompts share their head by topic
    prompts = [f"Tell me a long story about {TOPICS[i % len(TOPICS)]}, in many sentences ({i})."
               for i in range(prompts_needed(args, count))]

    def adapters_into(store: Path, n_virtual: int) -> list[str]:
        made = write_adapters(loaded.model, store, count, n_virtual, prefix=f"v{n_virtual}-")
        return [adapter_id for adapter_id, _ in made]

    points = run_http(args, loaded.path, adapters_into, prompts)
    where = (f"the GPU ({torch.cuda.get_device_name()})" if args.device == "cuda" else
             f"the CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)")
    header = (f"model {loaded.model_id}, {args.dtype} on {where}, {args.new_tokens} new tokens per request"
              f"{' (EOS ignored)' if args.ignore_eos else ''}, greedy, streamed; every adapter request on a "
              f"different adapter; {args.rounds or 1} round(s), pooled")
    report(points, args, header)
    return 0


if __name__ == "__main__":
    sys.exit(main())
