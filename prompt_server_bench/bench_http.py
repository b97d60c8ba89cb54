"""HTTP benchmark: streaming OpenAI clients against `prompt-server serve` and, in the same run, against
`transformers serve --continuous-batching`, over a sweep of loads.

    prompt-server bench --http [--endpoints completions,chat] [--concurrency 1,8,32,64] [--rates 1,2,4]
                        [--virtual-tokens 20,100] [--new-tokens 32] [--requests-per-client 2]
                        [--rounds 1] [--out DIR] [--transformers-cmd ".venv-bench/bin/transformers"]
                        [--skip-transformers]

Every request generates exactly --new-tokens tokens on both servers (EOS ignored, as `vllm bench serve` does;
--no-ignore-eos lets EOS end a response, and then the series generate different amounts). Series, all on one model
and one prompt set:
  - prompt-server, every request a different adapter of V virtual tokens (each --virtual-tokens value; the five
    kinds mixed: prompt tuning, P-tuning MLP and LSTM, prefix tuning with and without projection);
  - prompt-server, no adapter;
  - transformers serve --continuous-batching, no adapter (the newest transformers with its serving extras, in a
    virtual environment of its own: `make bench-http` installs it in .venv-bench).

Loads, per endpoint (streamed /v1/completions and streamed /v1/chat/completions):
  - closed loop: C clients, each sending its next request when its last one ends (C from --concurrency);
  - open loop: requests arriving as a Poisson process at R requests/s (R from --rates), as `vllm bench serve` does.

Both servers stay up side by side for the whole run, and every series of both is measured at each point in turn
(A B C D, then D C B A at the next point), so the series of a point run minutes apart at most and a machine whose
speed drifts weighs on all of them alike. With --rounds N the whole sweep runs N times, each point pooled over the
rounds, and every ratio is also given round by round, with its median. The servers' caches stay warm from point to
point, as in a running server: every adapter is used once before the first point. Every series of a point is sent
the same prompts, and no prompt is sent twice to one series: prompts share their head (a topic's words, the chat
template's system prompt), which prefix caching may reuse, but a whole prompt seen before would make a point's
numbers depend on what the cache still held from earlier points and rounds. Reported per point: output tokens/s
(generated tokens as each response's usage counts them, over the wall time from the first request sent to the last
one finished), time to first token (the first content chunk) and inter-token latency (the gaps between a
response's content chunks) p50 and p99, errors, and for prompt-server what its caches did meanwhile (prefix-cache
hits, prompt tokens they saved and evictions; soft prompts computed and evicted). The table goes to stdout and to
DIR/bench-http.md, every number to DIR/bench-http.json, and a plot to DIR/bench-http.png (matplotlib).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import random
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from prompt_server_bench.procs import free_port, stop, wait_healthy

PATHS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}
TRANSFORMERS = "transformers serve (no adapter)"
OURS_BASE = "prompt-server, no adapter"
# How each server is told to generate exactly max_tokens tokens: ours takes vLLM's `ignore_eos`; transformers serve
# takes a whole generation config, and its continuous batching stops at no token when the EOS id is -1.
OURS_IGNORE_EOS = {"ignore_eos": True}
TRANSFORMERS_IGNORE_EOS = {"generation_config": json.dumps({"eos_token_id": -1})}


def ours_adapters(v: int) -> str:
    return f"prompt-server, {v}-token adapters"


@dataclass
class Point:
    """One load point of one series on one endpoint."""

    series: str
    endpoint: str
    loop: str  # "closed" (level = concurrent clients) or "open" (level = requests/s)
    level: float
    extra: dict = field(default_factory=dict)  # request fields for this server (how it ignores EOS)
    requests: int = 0
    tokens: int = 0
    wall: float = 0.0
    errors: int = 0
    ttfts: list[float] = field(default_factory=list)
    itls: list[float] = field(default_factory=list)
    round_rates: list[float] = field(default_factory=list)  # tokens/s of each round pooled into this point
    # what the server's engine counted during the point (prompt-server's engine counters, `engine_counters`)
    server: dict[str, float] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.tokens / self.wall if self.wall else 0.0

    def summary(self) -> dict:
        return {"series": self.series, "endpoint": self.endpoint, "loop": self.loop, "level": self.level,
                "requests": self.requests, "errors": self.errors, "tokens": self.tokens,
                "tokens_per_request": self.tokens / self.requests if self.requests else 0.0, "wall_s": self.wall,
                "tokens_per_s": self.rate, "ttft_p50_s": pct(self.ttfts, 0.5), "ttft_p99_s": pct(self.ttfts, 0.99),
                "itl_p50_s": pct(self.itls, 0.5), "itl_p99_s": pct(self.itls, 0.99),
                "tokens_per_s_rounds": self.round_rates or [self.rate], "server": self.server}


def pct(values: list[float], q: float) -> float:
    """The q-quantile by the nearest rank (nan for no values)."""
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


async def one_request(client: httpx.AsyncClient, url: str, endpoint: str, model: str, prompt: str,
                      new_tokens: int, extra: dict | None = None) -> tuple[list[float], int]:
    """One streamed request, greedy; -> (the arrival time of each content chunk in seconds from the send, tokens
    generated). Tokens come from the final usage chunk where the server sends one, else one per content chunk (a
    token whose text is still an incomplete character is sent with the next one)."""
    body = {"model": model, "max_tokens": new_tokens, "stream": True, "temperature": 0,
            "stream_options": {"include_usage": True}, **(extra or {})}
    if endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    start = time.perf_counter()
    arrivals = []
    usage = None
    async with client.stream("POST", url + PATHS[endpoint], json=body) as resp:
        if resp.status_code != 200:
            await resp.aread()
            raise RuntimeError(f"{resp.status_code}: {resp.text[:200]}")
        async for line in resp.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            for choice in chunk.get("choices", []):
                if (choice.get("delta") or {}).get("content") or choice.get("text"):
                    arrivals.append(time.perf_counter() - start)
            usage = (chunk.get("usage") or {}).get("completion_tokens", usage)
    return arrivals, len(arrivals) if usage is None else usage


def _record(point: Point, arrivals: list[float], tokens: int) -> None:
    point.requests += 1
    point.tokens += tokens
    if arrivals:
        point.ttfts.append(arrivals[0])
        point.itls += [b - a for a, b in itertools.pairwise(arrivals)]


async def _guarded(point: Point, client, url, model, prompt, new_tokens) -> None:
    try:
        _record(point, *await one_request(client, url, point.endpoint, model, prompt, new_tokens, point.extra))
    except (httpx.HTTPError, RuntimeError, ValueError) as exc:  # counted and reported, the run goes on
        point.errors += 1
        print(f"request failed: {exc}", file=sys.stderr)


async def closed_loop(point: Point, url: str, models: list[str], prompts: list[str], new_tokens: int) -> Point:
    """`point.level` clients share the request list; each sends its next request when its last one ends."""
    queue: asyncio.Queue = asyncio.Queue()
    for i, p in enumerate(prompts):
        queue.put_nowait((models[i % len(models)], p))
    clients = int(point.level)

    async def worker(client):
        while not queue.empty():
            model, prompt = queue.get_nowait()
            await _guarded(point, client, url, model, prompt, new_tokens)

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=clients + 4)) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(clients)))
        point.wall = time.perf_counter() - start
    return point


async def open_loop(point: Point, url: str, models: list[str], prompts: list[str], new_tokens: int,
                    seed: int = 0) -> Point:
    """Requests sent at Poisson arrival times of rate `point.level` per second, whatever is still running."""
    rng = random.Random(seed)
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=len(prompts) + 4)) as client:
        start = time.perf_counter()
        tasks = []
        due = 0.0
        for i, prompt in enumerate(prompts):
            await asyncio.sleep(max(0.0, start + due - time.perf_counter()))
            tasks.append(asyncio.create_task(
                _guarded(point, client, url, models[i % len(models)], prompt, new_tokens)))
            due += rng.expovariate(point.level)
        await asyncio.gather(*tasks)
        point.wall = time.perf_counter() - start
    return point


def warm_up(url: str, models: list[str], prompts: list[str], args, extra: dict) -> None:
    """Every model once, at the widest load (an adapter's soft-prompt keys/values are computed at its first use,
    once per version, and the first steps at a wide batch run slow, as in a server that has seen its adapters and
    its load before), then a few requests on each endpoint. Nothing is recorded. `prompts`: the warm-up's own
    (`warm_up_count`), none of which a measured point sends."""
    widest = max([8, *args.concurrency])
    asyncio.run(closed_loop(Point("warm-up", args.endpoints[0], "closed", widest, extra), url, models,
                            _take(prompts, max(widest, len(models))), 4))
    for endpoint in args.endpoints:
        warm = Point("warm-up", endpoint, "closed", 8, extra)
        asyncio.run(closed_loop(warm, url, models, _take(prompts, 8), 4))


def warm_up_count(args, most_models: int) -> int:
    """Prompts `warm_up` sends to a server whose series have at most `most_models` models."""
    return max(8, *args.concurrency, most_models)


def requests_at(args, loop: str, level: float) -> int:
    """Requests one point sends: each client's share in a closed loop, rate x seconds in an open one (at least 8)."""
    return max(8, int(level) * args.requests_per_client if loop == "closed" else round(level * args.open_seconds))


def prompts_needed(args, most_models: int) -> int:
    """Prompts for a whole run in which no series is sent the same prompt twice: the warm-up's, then each point's
    in each round (`interleaved`)."""
    return warm_up_count(args, most_models) + (args.rounds or 1) * sum(requests_at(args, loop, level)
                                                                       for _, loop, level in slots(args))


def slots(args) -> list[tuple[str, str, float]]:
    """(endpoint, loop, level) of every point of one round: per endpoint, its closed-loop concurrencies, then its
    Poisson rates."""
    return [(e, loop, level) for e in args.endpoints
            for loop, levels in (("closed", args.concurrency), ("open", args.rates)) for level in levels]


# prompt-server's engine counters a point records (/metrics, prompt_server_engine_<name>_total): prefix-cache hits
# and the prompt tokens they saved, prefix-cache evictions, soft prompts computed and evicted, decode steps, the
# running batch's cache laid out anew; the steps that ran prompts and the decode-only ones, each with their seconds
# (where the engine's time went); and on a GPU the decode steps replayed from CUDA graphs and the graphs recorded
# (model/graphs.py)
ENGINE_COUNTERS = ("prefix_cache_hits", "prefix_cache_reused_tokens", "prefix_cache_evictions", "prompt_kv_misses",
                   "prompt_kv_evictions", "steps", "cache_relayouts", "prefill_steps", "prefill_step_seconds",
                   "decode_only_steps", "decode_only_step_seconds", "decode_graph_steps", "decode_graph_captures")


def engine_counters(url: str) -> dict[str, float]:
    """ENGINE_COUNTERS from the server's /metrics; none from a server without them (transformers serve)."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        resp = httpx.get(url + "/metrics", timeout=30)
    except httpx.HTTPError:
        return {}
    if resp.status_code != 200:
        return {}
    found = {}
    for family in text_string_to_metric_families(resp.text):
        for sample in family.samples:
            name = sample.name.removeprefix("prompt_server_engine_").removesuffix("_total")
            if sample.name.startswith("prompt_server_engine_") and name in ENGINE_COUNTERS:
                found[name] = sample.value
    return found


def measure(url: str, series: str, models: list[str], prompts: list[str], args, extra: dict, endpoint: str,
            loop: str, level: float) -> Point:
    """One point, a request per prompt of `prompts`, in order: `extra` holds the request fields that make this
    server ignore EOS (with --ignore-eos), so every server generates the same number of tokens for every request.
    The server's engine counters are read before and after (`engine_counters`), and the point keeps what they
    counted during it."""
    extra = extra if args.ignore_eos else {}
    point = Point(series, endpoint, loop, level, extra)
    before = engine_counters(url)
    if loop == "closed":
        asyncio.run(closed_loop(point, url, models, prompts, args.new_tokens))
    else:
        asyncio.run(open_loop(point, url, models, prompts, args.new_tokens))
    after = engine_counters(url)
    point.server = {k: after[k] - before[k] for k in after if k in before}
    return point


Run = tuple[str, str, list[str], dict]  # (server url, series name, its models, the fields that make it ignore EOS)


def interleaved(runs: list[Run], prompts: list[str], args) -> list[Point]:
    """`args.rounds` rounds over every point (`slots`); at each point every series of every running server is
    measured in turn, minutes apart at most, in reversed order at every other point and round (A B C, C B A, ...),
    so a machine whose speed drifts during the run weighs on every series alike. Every series of a point gets the
    same prompts, and no point or round repeats another's (nor the warm-up's) while `prompts` lasts
    (`prompts_needed`): a prompt sent twice under one adapter would find its whole head in that server's prefix
    cache, and what the cache still held would then depend on everything the run sent before. Each point pooled
    over the rounds (tokens over wall time, every latency sample), its rates per round kept in round order; the
    points ordered by series (as in `runs`), then as in `slots`."""
    warm = warm_up_count(args, max(len(models) for _, _, models, _ in runs))
    for url, _, models, extra in runs:
        warm_up(url, models, prompts[:warm], args, extra if args.ignore_eos else {})
    points: list[Point] = []
    every = slots(args)
    start = warm
    for r in range(args.rounds or 1):
        for i, (endpoint, loop, level) in enumerate(every):
            n = requests_at(args, loop, level)
            these = _take(prompts, n, start)
            start += n
            for url, series, models, extra in runs if (r + i) % 2 == 0 else runs[::-1]:
                point = measure(url, series, models, these, args, extra, endpoint, loop, level)
                points.append(point)
                _progress(point)
    series = [run[1] for run in runs]
    return sorted(pooled(points), key=lambda p: (series.index(p.series), every.index((p.endpoint, p.loop, p.level))))


def pooled(points: list[Point]) -> list[Point]:
    """One point per (series, endpoint, loop, level), in first-seen order: counts and wall times summed, latency
    samples joined."""
    out: dict[tuple, Point] = {}
    for p in points:
        key = (p.series, p.endpoint, p.loop, p.level)
        if key not in out:
            out[key] = Point(p.series, p.endpoint, p.loop, p.level, p.extra)
        q = out[key]
        q.requests += p.requests
        q.tokens += p.tokens
        q.wall += p.wall
        q.errors += p.errors
        q.ttfts += p.ttfts
        q.itls += p.itls
        q.round_rates.append(p.rate)
        for k, v in p.server.items():
            q.server[k] = q.server.get(k, 0.0) + v
    return list(out.values())


def _take(prompts: list[str], n: int, start: int = 0) -> list[str]:
    """n prompts from `start` on, round the list again when it is too short (none when it is empty)."""
    return [prompts[(start + i) % len(prompts)] for i in range(n)] if prompts else []


def _progress(p: Point) -> None:
    load = f"{int(p.level)} clients" if p.loop == "closed" else f"{p.level:g} req/s"
    print(f"{p.series} | {p.endpoint} | {load}: {p.rate:.1f} tok/s, TTFT p50 {pct(p.ttfts, 0.5):.3f} s, "
          f"ITL p50 {pct(p.itls, 0.5) * 1000:.0f} ms, errors {p.errors}"
          + "".join(f", {k} {v:g}" for k, v in p.server.items()), file=sys.stderr, flush=True)


def run_http(args, model_dir: Path, write_adapters, prompts: list[str]) -> list[Point]:
    """Start both servers on free ports (ours alone with --skip-transformers) and measure them `interleaved`: they
    stay up side by side the whole run, and the one not measured idles (a few CPU-ms a second).
    `write_adapters(store, v)` -> adapter ids of V virtual tokens written into `store`."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    widest = max(args.concurrency, default=1)
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as running:
        store = Path(tmp) / "adapters"
        store.mkdir()
        ids = {v: write_adapters(store, v) for v in args.virtual_tokens}
        ours = f"http://127.0.0.1:{free_port()}"
        queue = max(1024, 4 * len(prompts))
        cmds = {ours: [sys.executable, "-m", "prompt_server.cli", "serve", "--model", str(model_dir), "--adapters",
                       str(store), "--port", ours.rsplit(":", 1)[1], "--max-batch-size", str(widest),
                       "--max-queue", str(queue), "--max-virtual-tokens", str(max([128, *args.virtual_tokens])),
                       "--device", args.device, "--dtype", args.dtype]}
        if not args.skip_transformers:
            theirs = f"http://127.0.0.1:{free_port()}"
            # `transformers serve [FORCE_MODEL] --continuous-batching`
            cmds[theirs] = shlex.split(args.transformers_cmd) + [
                "serve", str(model_dir), "--continuous-batching", "--device", args.device, "--dtype", args.dtype,
                "--host", "127.0.0.1", "--port", theirs.rsplit(":", 1)[1]]
        procs = {}
        for url, cmd in cmds.items():
            procs[url] = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            running.callback(stop, procs[url])
        for url, proc in procs.items():
            wait_healthy(url, proc, timeout=600)
        base = httpx.get(ours + "/v1/models", timeout=30).json()["data"][0]["id"]
        runs: list[Run] = [(ours, ours_adapters(v), ids[v], OURS_IGNORE_EOS) for v in args.virtual_tokens]
        runs.append((ours, OURS_BASE, [base], OURS_IGNORE_EOS))
        if not args.skip_transformers:
            runs.append((theirs, TRANSFORMERS, [str(model_dir)], TRANSFORMERS_IGNORE_EOS))
        return interleaved(runs, prompts, args)


def _load(p: dict) -> str:
    return f"{int(p['level'])} clients" if p["loop"] == "closed" else f"Poisson {p['level']:g} req/s"


def table(points: list[dict]) -> str:
    """Markdown: one row per point, and the ratios against transformers serve at each closed-loop load."""
    lines = [("| endpoint | load | series | tokens/s | tokens/request | TTFT p50 s | TTFT p99 s | ITL p50 ms | "
              "ITL p99 ms | errors |"),
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for p in points:
        lines.append(f"| {PATHS[p['endpoint']]} | {_load(p)} | {p['series']} | {p['tokens_per_s']:.1f} | "
                     f"{p['tokens_per_request']:.1f} | "
                     f"{p['ttft_p50_s']:.3f} | {p['ttft_p99_s']:.3f} | {p['itl_p50_s'] * 1000:.0f} | "
                     f"{p['itl_p99_s'] * 1000:.0f} | {p['errors']} |")
    ratios = []
    by_key = {(p["series"], p["endpoint"], p["loop"], p["level"]): p for p in points}
    for p in points:
        if p["loop"] != "closed" or p["series"] == TRANSFORMERS:
            continue
        for against in (TRANSFORMERS, OURS_BASE):
            other = by_key.get((against, p["endpoint"], "closed", p["level"]))
            if other and other is not p and other["tokens_per_s"]:
                ratios.append(f"| {PATHS[p['endpoint']]} | {_load(p)} | {p['series']} / {against} | "
                              f"{p['tokens_per_s'] / other['tokens_per_s']:.2f} | {_per_round(p, other)} |")
    if ratios:
        lines += ["", "| endpoint | load | ratio of tokens/s | pooled | per round (median) |",
                  "|---|---|---|---:|---|", *ratios]
    return "\n".join(lines)


def _per_round(p: dict, other: dict) -> str:
    """The ratio in each round (the two series measured next to each other in time, `interleaved`): how much of
    the pooled ratio the machine's drift could move. Blank for one round."""
    a, b = p.get("tokens_per_s_rounds", []), other.get("tokens_per_s_rounds", [])
    if len(a) < 2 or len(a) != len(b) or not all(b):
        return ""
    each = [x / y for x, y in zip(a, b)]
    return ", ".join(f"{r:.2f}" for r in each) + f" ({statistics.median(each):.2f})"


def plot(points: list[dict], path: Path) -> None:
    """Per endpoint: tokens/s against concurrent clients, and TTFT p50 against the Poisson request rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    endpoints = list(dict.fromkeys(p["endpoint"] for p in points))
    fig, axes = plt.subplots(len(endpoints), 3, figsize=(15, 4.2 * len(endpoints)), squeeze=False)
    for row, endpoint in zip(axes, endpoints):
        for series in dict.fromkeys(p["series"] for p in points):
            closed = [p for p in points if (p["series"], p["endpoint"], p["loop"]) == (series, endpoint, "closed")]
            opened = [p for p in points if (p["series"], p["endpoint"], p["loop"]) == (series, endpoint, "open")]
            if closed:
                row[0].plot([p["level"] for p in closed], [p["tokens_per_s"] for p in closed], marker="o",
                            label=series)
                row[1].plot([p["level"] for p in closed], [p["itl_p99_s"] * 1000 for p in closed], marker="o",
                            label=series)
            if opened:
                row[2].plot([p["level"] for p in opened], [p["ttft_p50_s"] for p in opened], marker="o",
                            label=series)
        titles = ("output tokens/s, closed loop", "inter-token latency p99 (ms), closed loop",
                  "time to first token p50 (s), Poisson arrivals")
        xlabels = ("concurrent clients", "concurrent clients", "requests/s")
        for ax, title, xlabel in zip(row, titles, xlabels):
            ax.set_title(f"{PATHS[endpoint]}: {title}", fontsize=9)
            ax.set_xlabel(xlabel)
            ax.grid(alpha=0.3)
        row[0].set_xscale("log", base=2)
        row[1].set_xscale("log", base=2)
        row[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(points: list[Point], args, header: str) -> str:
    """Print the table; write it, the raw numbers and the plot under args.out."""
    rows = [p.summary() for p in points]
    text = f"{header}\n\n{table(rows)}\n"
    print("\n" + text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench-http.md").write_text(text)
    (out / "bench-http.json").write_text(json.dumps({"header": header, "points": rows,
                                                      "raw": [asdict(p) for p in points]}, indent=1))
    plot(rows, out / "bench-http.png")
    print(f"wrote {out / 'bench-http.md'}, {out / 'bench-http.json'} and {out / 'bench-http.png'}")
    return text
