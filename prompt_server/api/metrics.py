"""Prometheus metrics with prometheus_client: request counters and latency histograms in a per-app registry.

What the API layer measures itself lives in prometheus_client metric objects; the engine's counters and gauges and
the number of adapters are read at scrape time by a custom collector, never copied into metric objects.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterator, Mapping
from contextvars import ContextVar

from prometheus_client import (
    CollectorRegistry,
    Counter,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

# The server has never exported `<name>_created` series; this switch is process-wide in prometheus_client.
disable_created_metrics()

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
PER_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)
TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384)

_HISTOGRAMS = {
    "queue_seconds": LATENCY_BUCKETS,
    "time_to_first_token_seconds": LATENCY_BUCKETS,
    "time_per_output_token_seconds": PER_TOKEN_BUCKETS,
    "request_duration_seconds": LATENCY_BUCKETS,
    "prompt_tokens": TOKEN_BUCKETS,
    "generated_tokens": TOKEN_BUCKETS,
}
_REQUEST_LABELS = ("route", "adapter", "status")
_ENGINE_GAUGES = {"queue_depth", "running", "prompt_kv_bytes", "prefix_cache_bytes"}

EngineStats = Mapping[str, float]
# Values a caller of Metrics.render() hands in for one scrape, in place of the collector's sources.
_scrape_values: ContextVar[tuple[EngineStats | None, int | None] | None] = ContextVar("_scrape_values", default=None)


class EngineCollector(Collector):
    """The engine's stats() and the adapter count, read when the registry is collected.

    The engine's queue_depth, running and cache sizes are gauges, every other stat a counter named
    `prompt_server_engine_<stat>_total`; `prompt_server_batch_size_mean` is derived from its steps and batch_size_sum.
    """

    def __init__(self, engine_stats: Callable[[], EngineStats], adapters_loaded: Callable[[], int]):
        self.engine_stats = engine_stats
        self.adapters_loaded = adapters_loaded

    def describe(self) -> list[Metric]:
        return []  # the engine's stats are only known at scrape time; nothing for the registry to check up front

    def collect(self) -> Iterator[Metric]:
        given_stats, given_adapters = _scrape_values.get() or (None, None)
        stats = {k: float(v) for k, v in (self.engine_stats() if given_stats is None else given_stats).items()}
        adapters = self.adapters_loaded() if given_adapters is None else given_adapters
        yield GaugeMetricFamily("prompt_server_adapters_loaded", "Adapters in the registry.", value=adapters)
        steps = stats.get("steps", 0.0)
        if steps:
            yield GaugeMetricFamily("prompt_server_batch_size_mean", "Mean rows per forward pass since start.",
                                    value=stats.get("batch_size_sum", 0.0) / steps)
        for key, value in sorted(stats.items()):
            name = "prompt_server_engine_" + re.sub(r"[^A-Za-z0-9_]", "_", key)
            if key in _ENGINE_GAUGES:
                yield GaugeMetricFamily(name, "", value=value)
            else:
                # CounterMetricFamily drops one trailing `_total` and the exposition appends it again: with ours
                # appended first, a stat whose name ends in `_total` keeps it (`<stat>_total_total`, as before)
                yield CounterMetricFamily(name + "_total", "", value=value)


class Metrics:
    """What the API layer measures itself plus the engine's own counters, in one per-app registry.

    engine_stats and adapters_loaded are the sources the registry reads at scrape time; render() may also be handed
    the values for one scrape.
    """

    # The text format 0.0.4 every Prometheus reads (prometheus_client's CONTENT_TYPE_LATEST announces 1.0.0, which
    # Prometheus 2.x does not know); the body is the same for these metric names.
    content_type = "text/plain; version=0.0.4; charset=utf-8"

    def __init__(
        self,
        engine_stats: Callable[[], EngineStats] | None = None,
        adapters_loaded: Callable[[], int] | None = None,
    ) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "prompt_server_requests", "HTTP requests by route, adapter and status code.", _REQUEST_LABELS,
            registry=self.registry,
        )
        self.hist: dict[str, Histogram] = {
            name: Histogram(f"prompt_server_{name}", f"{name.replace('_', ' ')} per generation request.",
                            buckets=buckets, registry=self.registry)
            for name, buckets in _HISTOGRAMS.items()
        }
        self.engine = EngineCollector(engine_stats or dict, adapters_loaded or (lambda: 0))
        self.registry.register(self.engine)
        # the process's own, as prometheus_client's default registry has them: resident memory, CPU seconds and
        # open files (process_*, where /proc exists), the cycle collector's passes per generation (python_gc_*;
        # tensors that only the collector frees wait for its next full pass), the Python version (python_info)
        ProcessCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        self._lock = threading.Lock()  # one generation's histograms are updated together

    def count_request(self, route: str, adapter: str, status: int) -> None:
        self.requests.labels(route=route, adapter=adapter, status=str(status)).inc()

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

    def render(self, engine_stats: EngineStats | None = None, adapters_loaded: int | None = None) -> str:
        """The exposition text (`generate_latest` of the registry); engine_stats and adapters_loaded, when given,
        stand in for the collector's sources during this scrape."""
        token = _scrape_values.set((engine_stats, adapters_loaded))
        try:
            with self._lock:
                text = generate_latest(self.registry).decode("utf-8")
        finally:
            _scrape_values.reset(token)
        return _as_before(text)


# prometheus_client writes label names sorted and a `# HELP` line for every family, even one without help text.
# GET /metrics has always written prompt_server_requests_total's labels as route, adapter, status (clients and the
# tests match that text) and no HELP line for the engine's stats: keep both.
_REQUEST_SAMPLE = re.compile(
    r'^(prompt_server_requests_total)\{adapter="((?:[^"\\]|\\.)*)",route="((?:[^"\\]|\\.)*)",'
    r'status="((?:[^"\\]|\\.)*)"\}',
    re.MULTILINE,
)
_EMPTY_HELP = re.compile(r"^# HELP \S+ \n", re.MULTILINE)


def _as_before(text: str) -> str:
    text = _EMPTY_HELP.sub("", text)
    return _REQUEST_SAMPLE.sub(r'\1{route="\3",adapter="\2",status="\4"}', text)
