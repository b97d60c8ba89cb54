"""Prometheus text exposition, written by hand: request counters and latency histograms."""

from __future__ import annotations

import re
import threading
from collections import defaultdict

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
PER_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)
TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(pairs: tuple[tuple[str, str], ...]) -> str:
    if not pairs:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in pairs) + "}"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


class Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.total = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        for i, upper in enumerate(self.buckets):
            if value <= upper:
                self.counts[i] += 1
        self.total += 1
        self.sum += value

    def lines(self, name: str) -> list[str]:
        out = [f'{name}_bucket{{le="{_number(b)}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        out.append(f'{name}_bucket{{le="+Inf"}} {self.total}')
        out.append(f"{name}_sum {_number(self.sum)}")
        out.append(f"{name}_count {self.total}")
        return out


class Metrics:
    """What the API layer measures itself; the engine's own counters are added at render time."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[tuple[str, str], ...], int] = defaultdict(int)
        self.hist = {
            "queue_seconds": Histogram(LATENCY_BUCKETS),
            "time_to_first_token_seconds": Histogram(LATENCY_BUCKETS),
            "time_per_output_token_seconds": Histogram(PER_TOKEN_BUCKETS),
            "request_duration_seconds": Histogram(LATENCY_BUCKETS),
            "prompt_tokens": Histogram(TOKEN_BUCKETS),
            "generated_tokens": Histogram(TOKEN_BUCKETS),
        }

    def count_request(self, route: str, adapter: str, status: int) -> None:
        with self._lock:
            self.requests[(("route", route), ("adapter", adapter), ("status", str(status)))] += 1

    def observe_generation(
        self, *, queue: float, first_token: float, total: float, prompt_tokens: int, generated: int
    ) -> None:
        with self._lock:
            self.hist["queue_seconds"].observe(queue)
            self.hist["request_duration_seconds"].observe(total)
            self.hist["prompt_tokens"].observe(prompt_tokens)
            self.hist["generated_tokens"].observe(generated)
            if generated > 0:
                self.hist["time_to_first_token_seconds"].observe(first_token)
            if generated > 1:
                self.hist["time_per_output_token_seconds"].observe(max(0.0, total - first_token) / (generated - 1))

    def render(self, engine_stats: dict[str, float], adapters_loaded: int) -> str:
        """The exposition text; the engine's queue_depth and running are gauges, its other stats counters."""
        lines = [
            "# HELP prompt_server_requests_total HTTP requests by route, adapter and status code.",
            "# TYPE prompt_server_requests_total counter",
        ]
        with self._lock:
            for labels, value in sorted(self.requests.items()):
                lines.append(f"prompt_server_requests_total{_labels(labels)} {value}")
            for name, hist in self.hist.items():
                metric = f"prompt_server_{name}"
                lines.append(f"# HELP {metric} {name.replace('_', ' ')} per generation request.")
                lines.append(f"# TYPE {metric} histogram")
                lines.extend(hist.lines(metric))
        lines += [
            "# HELP prompt_server_adapters_loaded Adapters in the registry.",
            "# TYPE prompt_server_adapters_loaded gauge",
            f"prompt_server_adapters_loaded {adapters_loaded}",
        ]
        steps = engine_stats.get("steps", 0.0)
        if steps:
            lines += [
                "# HELP prompt_server_batch_size_mean Mean rows per forward pass since start.",
                "# TYPE prompt_server_batch_size_mean gauge",
                f"prompt_server_batch_size_mean {_number(engine_stats.get('batch_size_sum', 0.0) / steps)}",
            ]
        for key, value in sorted(engine_stats.items()):
            kind = "gauge" if key in _ENGINE_GAUGES else "counter"
            metric = "prompt_server_engine_" + re.sub(r"[^A-Za-z0-9_]", "_", key) + ("_total" if kind == "counter" else "")
            lines.append(f"# TYPE {metric} {kind}")
            lines.append(f"{metric} {_number(value)}")
        return "\n".join(lines) + "\n"


_ENGINE_GAUGES = {"queue_depth", "running", "prompt_kv_bytes", "prefix_cache_bytes"}
