"""The in-process benchmark (`prompt-server bench`), end to end on a tiny model: every mode runs and is reported."""

from __future__ import annotations

import re
import threading

from prompt_server.model import omp
from prompt_server_bench import bench


def test_every_mode_runs_and_the_table_and_ratios_are_reported(tiny_llama_dir, capsys, monkeypatch):
    released_here = []
    release = omp.release

    def spy() -> bool:
        if threading.current_thread() is threading.main_thread():
            released_here.append(True)
        return release()

    monkeypatch.setattr(omp, "release", spy)
    code = bench.main(["--model", str(tiny_llama_dir), "--modes", "abcdef", "--requests", "3", "--new-tokens", "2",
                       "--virtual-tokens", "4", "--rounds", "1"])
    captured = capsys.readouterr()
    out = captured.out
    assert code == 0
    # each round line of an engine mode counts its decode steps (3 requests x 2 tokens: one at least; more where the
    # prompts are prefilled in groups) and cache relayouts (at most one per group joining the first), HF's none; no
    # CUDA graphs on the CPU
    lines = dict(re.findall(r"^round 1 ([a-f]): +[0-9.]+ tok/s(.*)$", captured.err, re.MULTILINE))
    assert sorted(lines) == list("abcdef")
    assert all(lines[m] == "" for m in "abc")
    for m in "def":
        counts = re.fullmatch(r", decode steps (\d+), cache relayouts (\d+), prefill steps (\d+) \(([0-9.]+) s\), "
                              r"decode-only steps (\d+) \(([0-9.]+) s\)", lines[m])
        assert counts and 1 <= int(counts.group(1)) <= 3 and int(counts.group(2)) <= 2, lines[m]
        # 3 requests: prefilled in 1-3 steps, their second tokens decoded in at most 2 more; a step is counted once
        # it has handed out its tokens, so the line may also hold the step before the round's first
        assert int(counts.group(3)) <= 4 and int(counts.group(5)) <= 3, lines[m]
        assert float(counts.group(4)) >= 0 and float(counts.group(6)) >= 0, lines[m]
    rates = dict(re.findall(r"^\| ([a-f]) \| .+ \| ([0-9.]+) \|$", out, re.MULTILINE))
    assert sorted(rates) == list("abcdef") and all(float(r) > 0 for r in rates.values())
    assert "3 requests x 2 new tokens" in out and "4 virtual tokens per adapter" in out
    for ratio in ("(d)/(a)", "(d)/(b)", "(d)/(c)", "(d)/(e)", "(f)/(e)", "(d)/(f)"):
        assert re.search(rf"^{re.escape(ratio)} = [0-9.]+$", out, re.MULTILINE), ratio
    # this thread's OpenMP workers go after each thing it runs, so that they never slow the engines' (model/omp.py):
    # the two engines' starts, the warm-up's HF pass, and modes a, b and c
    assert len(released_here) == 6
