"""Budget, seed and tally shared by the fuzz tests.

Short form (CI, the default): a fixed seed, derandomized hypothesis, a few examples per target; tests/fuzz runs in
about a minute on two CPU cores. Long form: PROMPT_SERVER_FUZZ_EXAMPLES=N sets N examples for every schema operation
and every property (and random seeds unless PROMPT_SERVER_FUZZ_SEED fixes one), e.g.

    PROMPT_SERVER_FUZZ_EXAMPLES=2000 pytest -p no:cacheprovider tests/fuzz

Every input tried is counted per suite / target / strategy; the pytest summary prints the table ("inputs fuzzed"),
and PROMPT_SERVER_FUZZ_REPORT=path.json writes it as JSON too.
"""

from __future__ import annotations

import collections
import os
import random
import time
from collections.abc import Callable
from typing import Any

from hypothesis import HealthCheck, Phase, seed, settings

EXAMPLES_ENV = "PROMPT_SERVER_FUZZ_EXAMPLES"
SEED_ENV = "PROMPT_SERVER_FUZZ_SEED"
REPORT_ENV = "PROMPT_SERVER_FUZZ_REPORT"

LONG_EXAMPLES: int | None = int(os.environ[EXAMPLES_ENV]) if os.environ.get(EXAMPLES_ENV) else None
LONG = LONG_EXAMPLES is not None
SHORT_SEED = 20240917  # the short form's fixed seed: CI sees the same inputs on every run
SEED: int = int(os.environ[SEED_ENV]) if os.environ.get(SEED_ENV) else (
    random.SystemRandom().randrange(2**32) if LONG else SHORT_SEED)

SUPPRESSED = [HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large,
              HealthCheck.large_base_example]


def examples(short: int) -> int:
    """Examples for one target: `short` in the short form, PROMPT_SERVER_FUZZ_EXAMPLES in the long one."""
    return LONG_EXAMPLES if LONG_EXAMPLES is not None else short


def fuzz_settings(short: int, *, shrink_in_short_form: bool = True) -> Callable[[Callable], Callable]:
    """Hypothesis settings for a property: bounded, no example database, no deadline (CI machines are slow), the
    same inputs on every run (derandomized in the short form, seeded by SEED in the long one). Suites whose every
    input is an HTTP request pass shrink_in_short_form=False: CI then reports the failing input as found rather than
    spend minutes shrinking it (the long form shrinks)."""
    phases = list(Phase)
    if not LONG and not shrink_in_short_form:
        phases = [p for p in phases if p is not Phase.shrink]

    def apply(fn: Callable) -> Callable:
        fn = settings(max_examples=examples(short), deadline=None, database=None, derandomize=not LONG,
                      suppress_health_check=SUPPRESSED, print_blob=True, phases=phases)(fn)
        return fn if not LONG else seed(SEED)(fn)

    return apply


class Tally:
    """Inputs tried per (suite, target, strategy), and seconds per suite."""

    def __init__(self) -> None:
        self.counts: collections.Counter[tuple[str, str, str]] = collections.Counter()
        self.seconds: collections.Counter[str] = collections.Counter()
        self.statuses: collections.Counter[tuple[str, str]] = collections.Counter()

    def add(self, suite: str, target: str, strategy: str, n: int = 1) -> None:
        self.counts[(suite, target, strategy)] += n

    def status(self, suite: str, code: int | str) -> None:
        """An HTTP answer's status, to show how deep the inputs went (2xx: past validation into the engine)."""
        self.statuses[(suite, str(code))] += 1

    def answers(self, suite: str) -> dict[str, int]:
        return {code: n for (s, code), n in sorted(self.statuses.items()) if s == suite}

    def timed(self, suite: str, started: float) -> None:
        self.seconds[suite] += time.monotonic() - started

    def total(self, suite: str | None = None) -> int:
        return sum(n for (s, _, _), n in self.counts.items() if suite is None or s == suite)

    def as_dict(self) -> dict[str, Any]:
        suites: dict[str, Any] = {}
        for (suite, target, strategy), n in sorted(self.counts.items()):
            suites.setdefault(suite, {}).setdefault(target, {})[strategy] = n
        return {"form": "long" if LONG else "short", "seed": SEED, "examples_per_target": LONG_EXAMPLES,
                "total": self.total(), "seconds": {k: round(v, 1) for k, v in self.seconds.items()},
                "suites": suites, "http_statuses": {s: self.answers(s) for s in sorted({s for s, _ in self.statuses})}}

    def lines(self) -> list[str]:
        out = [f"inputs fuzzed: {self.total()} ({'long' if LONG else 'short'} form, seed {SEED})"]
        for suite in sorted({s for s, _, _ in self.counts}):
            took = self.seconds.get(suite)
            out.append(f"  {suite}: {self.total(suite)} inputs" + (f" in {took:.1f} s" if took else ""))
            answers = self.answers(suite)
            if answers:
                out.append("    HTTP answers: " + ", ".join(f"{code} x{n}" for code, n in answers.items()))
            targets = sorted({t for s, t, _ in self.counts if s == suite})
            for target in targets:
                parts = [f"{strategy} {n}" for (s, t, strategy), n in sorted(self.counts.items())
                         if s == suite and t == target]
                out.append(f"    {target}: {', '.join(parts)}")
        return out


TALLY = Tally()
