"""The Metrics class on prometheus_client: a registry per app, engine values read at scrape time, today's names."""

from __future__ import annotations

import re

import psutil
import pytest
from prometheus_client import generate_latest
from prometheus_client.registry import Collector

from prompt_server.api.metrics import EngineCollector, Metrics


def _families(text: str) -> dict[str, str]:
    return dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.MULTILINE))


def test_engine_values_are_read_at_scrape_time():
    stats = {"queue_depth": 1.0, "running": 0.0, "steps": 2.0, "batch_size_sum": 2.0, "generated_tokens": 5.0}
    adapters = [0]
    m = Metrics(engine_stats=lambda: stats, adapters_loaded=lambda: len(adapters))
    assert isinstance(m.engine, EngineCollector) and Collector in type(m.engine).__mro__
    first = m.render()
    assert "prompt_server_engine_queue_depth 1.0" in first and "prompt_server_adapters_loaded 1.0" in first
    stats.update(queue_depth=3.0, steps=4.0, batch_size_sum=10.0, generated_tokens=9.0, prompt_kv_hits=2.0)
    adapters.append(1)
    text = m.render()
    assert "prompt_server_engine_queue_depth 3.0" in text
    assert "prompt_server_engine_generated_tokens_total 9.0" in text
    assert "prompt_server_engine_prompt_kv_hits_total 2.0" in text  # a stat that appeared since the last scrape
    assert "prompt_server_batch_size_mean 2.5" in text
    assert "prompt_server_adapters_loaded 2.0" in text
    # the registry itself reads the engine: any exposition of it sees the current values
    assert "prompt_server_engine_queue_depth 3.0" in generate_latest(m.registry).decode()


def test_values_handed_to_render_are_for_that_scrape_only():
    m = Metrics(engine_stats=lambda: {"queue_depth": 1.0}, adapters_loaded=lambda: 4)
    text = m.render({"queue_depth": 7, "steps": 0}, adapters_loaded=2)
    assert "prompt_server_engine_queue_depth 7.0" in text and "prompt_server_adapters_loaded 2.0" in text
    assert "prompt_server_batch_size_mean" not in text  # no steps yet: no mean
    text = m.render()
    assert "prompt_server_engine_queue_depth 1.0" in text and "prompt_server_adapters_loaded 4.0" in text
    assert "prompt_server_engine_steps" not in text


def test_names_types_and_help_are_the_documented_ones():
    m = Metrics()
    m.count_request("/generate", "none", 200)
    m.observe_generation(queue=0.01, first_token=0.02, total=0.1, prompt_tokens=5, generated=3)
    text = m.render({"queue_depth": 0, "running": 1, "prompt_kv_bytes": 64, "prefix_cache_bytes": 0, "steps": 1,
                     "batch_size_sum": 1, "generated_tokens": 3, "cache_relayouts": 0, "odd.key-name": 1,
                     "already_total": 2}, adapters_loaded=0)
    histograms = ["queue_seconds", "time_to_first_token_seconds", "time_per_output_token_seconds",
                  "request_duration_seconds", "prompt_tokens", "generated_tokens"]
    assert _families(text) == {
        "prompt_server_requests_total": "counter",
        **{f"prompt_server_{h}": "histogram" for h in histograms},
        "prompt_server_adapters_loaded": "gauge",
        "prompt_server_batch_size_mean": "gauge",
        "prompt_server_engine_already_total_total": "counter",
        "prompt_server_engine_batch_size_sum_total": "counter",
        "prompt_server_engine_cache_relayouts_total": "counter",
        "prompt_server_engine_generated_tokens_total": "counter",
        "prompt_server_engine_odd_key_name_total": "counter",
        "prompt_server_engine_prefix_cache_bytes": "gauge",
        "prompt_server_engine_prompt_kv_bytes": "gauge",
        "prompt_server_engine_queue_depth": "gauge",
        "prompt_server_engine_running": "gauge",
        "prompt_server_engine_steps_total": "counter",
        # prometheus_client's process, garbage-collector and platform collectors, in every app's registry
        "process_cpu_seconds_total": "counter",
        "process_max_fds": "gauge",
        "process_open_fds": "gauge",
        "process_resident_memory_bytes": "gauge",
        "process_start_time_seconds": "gauge",
        "process_virtual_memory_bytes": "gauge",
        "python_gc_collections_total": "counter",
        "python_gc_objects_collected_total": "counter",
        "python_gc_objects_uncollectable_total": "counter",
        "python_info": "gauge",
    }
    resident = float(re.search(r"^process_resident_memory_bytes (\S+)$", text, re.MULTILINE).group(1))
    assert resident == pytest.approx(psutil.Process().memory_info().rss, rel=0.2)
    assert re.search(r'^python_gc_collections_total\{generation="2"\} \d', text, re.MULTILINE)
    helps = dict(re.findall(r"^# HELP (prompt_server\S+) (.*)$", text, re.MULTILINE))
    assert helps == {
        "prompt_server_requests_total": "HTTP requests by route, adapter and status code.",
        **{f"prompt_server_{h}": f"{h.replace('_', ' ')} per generation request." for h in histograms},
        "prompt_server_adapters_loaded": "Adapters in the registry.",
        "prompt_server_batch_size_mean": "Mean rows per forward pass since start.",
    }  # the engine's stats carry no HELP line, as before
    assert "_created" not in text
    assert 'prompt_server_time_per_output_token_seconds_bucket{le="0.04"} 1.0' in text
    assert 'prompt_server_prompt_tokens_bucket{le="+Inf"} 1.0' in text


def test_request_labels_keep_their_order_and_escaping():
    m = Metrics()
    m.count_request("/generate", "none", 200)
    m.count_request("/generate", "none", 200)
    m.count_request("/x", 'a"b\\c\nd', 404)
    text = m.render({}, adapters_loaded=0)
    assert 'prompt_server_requests_total{route="/generate",adapter="none",status="200"} 2.0' in text
    assert 'prompt_server_requests_total{route="/x",adapter="a\\"b\\\\c\\nd",status="404"} 1.0' in text


def test_every_app_has_its_own_registry():
    a, b = Metrics(), Metrics()  # a second instance must not collide with the first's names
    a.count_request("/generate", "none", 200)
    a.hist["request_duration_seconds"].observe(0.3)
    text = b.render({}, adapters_loaded=0)
    assert "prompt_server_requests_total{" not in text
    assert "prompt_server_request_duration_seconds_count 0.0" in text
    assert a.registry is not b.registry
    assert Metrics.content_type == "text/plain; version=0.0.4; charset=utf-8"  # what Prometheus 2.x reads too
