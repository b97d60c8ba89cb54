"""The HTTP benchmark's sweep, end to end on a tiny model: both servers started, every load point measured, the
table, raw numbers and plot written."""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import pytest

from prompt_server.model.loader import load_model
from prompt_server_bench import bench_http
from prompt_server_bench.bench import write_adapters
from prompt_server_bench.bench_http import (
    ENGINE_COUNTERS,
    OURS_BASE,
    TRANSFORMERS,
    Point,
    closed_loop,
    ours_adapters,
    pct,
    report,
    run_http,
)

TRANSFORMERS_CMD = Path(sys.executable).with_name("transformers")


def test_nearest_rank_percentiles():
    assert pct([3.0, 1.0, 2.0], 0.5) == 2.0
    assert pct(list(range(101)), 0.99) == 99
    assert pct([], 0.5) != pct([], 0.5)  # nan


def test_a_failed_request_is_counted_and_the_run_goes_on():
    import asyncio

    point = Point("nobody", "completions", "closed", 2)
    asyncio.run(closed_loop(point, "http://127.0.0.1:9", ["m"], ["a", "b", "c"], 4))  # port 9: refused
    assert (point.errors, point.requests, point.tokens) == (3, 0, 0)


def test_series_of_both_servers_are_interleaved_point_by_point_and_pooled_over_rounds(monkeypatch):
    """Every series warmed up once; then at each point every series in turn, the order reversed at every other
    point and round (A B, B A, ...); each point sums its rounds' counts and wall times, joins their latency
    samples and keeps its rate per round in round order; the points come by series, then by slot. Every series
    of a point is sent the same prompts, and no point or round sends a prompt another (or the warm-up) sent."""
    warmed, calls, sent = [], [], []

    def measure(url, series, models, prompts, args, extra, endpoint, loop, level):
        calls.append((series, endpoint, loop, level))
        sent.append(prompts)
        n = len(calls)
        return Point(series, endpoint, loop, level, extra, requests=2, tokens=10 * n, wall=float(n), ttfts=[n],
                     itls=[n / 10])

    monkeypatch.setattr(bench_http, "measure", measure)
    monkeypatch.setattr(bench_http, "warm_up",
                        lambda url, models, prompts, *rest: warmed.append((url, models, prompts)))
    args = argparse.Namespace(rounds=2, endpoints=["completions", "chat"], concurrency=[4], rates=[2.0],
                              ignore_eos=True, requests_per_client=3, open_seconds=5.0)
    runs = [("http://ours", "A", ["a1", "a2"], {}), ("http://theirs", "B", ["b"], {})]
    # warm-up 8 (at least 8, 4 clients, 2 models), then per round 12 (4 clients x 3) + 10 (2/s x 5 s), twice
    assert bench_http.prompts_needed(args, 2) == 8 + 2 * 2 * (12 + 10)
    prompts = [f"p{i}" for i in range(8 + 88)]
    points = bench_http.interleaved(runs, prompts, args)
    assert warmed == [("http://ours", ["a1", "a2"], prompts[:8]), ("http://theirs", ["b"], prompts[:8])]
    slots = [("completions", "closed", 4), ("completions", "open", 2.0), ("chat", "closed", 4), ("chat", "open", 2.0)]
    order = ["AB", "BA", "AB", "BA", "BA", "AB", "BA", "AB"]  # round 1, then round 2, one pair per slot
    assert calls == [(s, *slot) for pair, slot in zip(order, slots * 2) for s in pair]
    assert sent[0::2] == sent[1::2]  # both series of a point: the same prompts
    assert [len(x) for x in sent[0::2]] == [12, 10, 12, 10] * 2
    assert list(itertools.chain.from_iterable(sent[0::2])) == prompts[8:]  # each once, after the warm-up's
    assert [(p.series, p.endpoint, p.loop, p.level) for p in points] == [
        (s, *slot) for s in "AB" for slot in slots]
    a, b = points[0], points[4]  # completions, 4 clients: calls 1 and 2 in round 1, 10 and 9 in round 2
    assert (a.series, a.requests, a.tokens, a.wall, a.ttfts) == ("A", 4, 10 + 100, 1 + 10, [1, 10])
    assert (b.series, b.requests, b.tokens, b.wall, b.ttfts) == ("B", 4, 20 + 90, 2 + 9, [2, 9])
    assert a.rate == 110 / 11 and b.itls == [0.2, 0.9]
    assert a.round_rates == [10.0, 10.0] and b.summary()["tokens_per_s_rounds"] == [10.0, 10.0]


def test_ratios_are_also_given_round_by_round():
    """Pooled ratios for every closed-loop point; per-round ratios and their median for two rounds or more, against
    the other server's series too (every point measured the series of both servers side by side)."""

    def point(series, rates):
        tokens = [100.0 * r for r in rates]  # 100 s per round
        return Point(series, "completions", "closed", 32, requests=64, tokens=int(sum(tokens)),
                     wall=100.0 * len(rates), round_rates=list(rates)).summary()

    ours, base = ours_adapters(100), OURS_BASE
    text = bench_http.table([point(ours, [9.0, 8.0, 10.0]), point(base, [10.0, 10.0, 10.0]),
                             point(TRANSFORMERS, [4.0, 5.0, 5.0])])
    assert f"| /v1/completions | 32 clients | {ours} / {base} | 0.90 | 0.90, 0.80, 1.00 (0.90) |" in text
    assert f"| /v1/completions | 32 clients | {ours} / {TRANSFORMERS} | 1.93 | 2.25, 1.60, 2.00 (2.00) |" in text
    assert f"| /v1/completions | 32 clients | {base} / {TRANSFORMERS} | 2.14 | 2.50, 2.00, 2.00 (2.00) |" in text
    one = bench_http.table([point(ours, [9.0]), point(base, [10.0])])
    assert f"| {ours} / {base} | 0.90 |  |" in one


@pytest.mark.skipif(not TRANSFORMERS_CMD.exists(), reason="the transformers command is not installed")
def test_sweep_against_transformers_serve_writes_table_json_and_plot(tiny_llama_dir, tmp_path):
    loaded = load_model(tiny_llama_dir, device="cpu", dtype="float32")
    args = argparse.Namespace(endpoints=["completions", "chat"], concurrency=[1, 4], rates=[8.0], new_tokens=6,
                              requests_per_client=2, open_seconds=1.0, virtual_tokens=[4], skip_transformers=False,
                              ignore_eos=True, rounds=1, device="cpu", dtype="float32",
                              transformers_cmd=str(TRANSFORMERS_CMD), out=str(tmp_path / "out"))

    def adapters_into(store: Path, n_virtual: int) -> list[str]:
        return [a for a, _ in write_adapters(loaded.model, store, 5, n_virtual, prefix=f"v{n_virtual}-")]

    prompts = [f"hello number {i}, tell me more" for i in range(8)]
    points = run_http(args, tiny_llama_dir, adapters_into, prompts)

    series = [ours_adapters(4), OURS_BASE, TRANSFORMERS]
    loads = [("closed", 1), ("closed", 4), ("open", 8.0)]
    assert [(p.series, p.endpoint, p.loop, p.level) for p in points] == [
        (s, e, loop, level) for s in series for e in args.endpoints for loop, level in loads]
    for p in points:
        assert p.errors == 0, p
        assert p.requests == 8  # max(8, clients x 2) closed, max(8, rate x seconds) open
        assert p.tokens == 8 * 6 and p.wall > 0  # EOS ignored on both servers; usage counts every token
        assert 0 < len(p.ttfts) <= 8 and all(t > 0 for t in p.ttfts)  # requests whose text was not empty
        assert len(p.itls) <= p.tokens - len(p.ttfts)  # gaps between a request's content chunks
        if p.series == TRANSFORMERS:
            assert p.server == {}  # it has no such counters
        else:
            # on the CPU no decode step is replayed from a CUDA graph, so the server has no graph counters
            assert set(p.server) == set(ENGINE_COUNTERS) - {"decode_graph_steps", "decode_graph_captures"}
            assert p.server["steps"] >= 5  # a decode step for every token of a request after its first
            # every point prefills its prompts, and the engine's steps ran within the point (a second for the reads)
            assert p.server["prefill_steps"] >= 1 and p.server["prefill_step_seconds"] > 0
            assert p.server["prefill_step_seconds"] + p.server["decode_only_step_seconds"] < p.wall + 1
            # soft prompts were computed at the warm-up and stay cached
            assert p.server["prompt_kv_misses"] == p.server["prompt_kv_evictions"] == 0
    # the 8 prompts come round again, so prefix caching finds whole heads
    assert sum(p.server.get("prefix_cache_hits", 0) for p in points) > 0

    text = report(points, args, "tiny model")
    out = tmp_path / "out"
    assert (out / "bench-http.md").read_text() == text
    rows = json.loads((out / "bench-http.json").read_text())["points"]
    assert len(rows) == len(points) and rows[0]["tokens_per_s"] == points[0].rate
    assert {r["tokens_per_request"] for r in rows} == {6.0}
    for s in series:
        assert f"| /v1/chat/completions | 4 clients | {s} |" in text
    assert f"| /v1/completions | 1 clients | {ours_adapters(4)} / {TRANSFORMERS} |" in text
    assert f"| /v1/completions | Poisson 8 req/s | {OURS_BASE} |" in text
    assert (out / "bench-http.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
