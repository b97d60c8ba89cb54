"""GET /health, /info and /metrics in process, and the pure helpers behind them."""

from __future__ import annotations

import gc
import re
import subprocess
import sys

import transformers

from prompt_server import __version__
from prompt_server.api.metrics import Metrics
from prompt_server.api.stops import StopTrimmer, trim_at_stop
from tests.api.oracle import saved_peft, upload_parts


def test_health_and_info(client):
    assert client.get("/health").json() == {"status": "ok"}
    info = client.get("/info").json()
    assert info["version"] == __version__
    assert info["model_dtype"] == "float32" and info["model_device"] == "cpu"
    assert info["limits"]["max_new_tokens"] == 512 and info["limits"]["max_input_tokens"] == 256
    assert info["limits"]["max_labels"] == 32
    assert info["model_id"]
    # the tiny Llama: what transformers version read it, which class, and the forward that serves it
    assert info["transformers_version"] == transformers.__version__
    assert (info["architecture"], info["model_type"]) == ("LlamaForCausalLM", "llama")
    assert (info["forward_path"], info["forward_path_reason"], info["forward_compiled"]) == ("lean", "", False)
    assert info["forward_native_kernels"] is True  # float32 on the CPU: decode attention by the built kernel
    assert info["forward_cuda_graphs"] is False  # no GPU
    assert info["max_position"] == 512 and info["serving_notes"] == []


def test_startup_objects_are_left_out_of_full_collections_while_serving(serve):
    """What startup made lives as long as the server: frozen, a full pass of the cycle collector no longer walks it
    (with the default model some 400k objects, 250-280 ms a pass with the GIL held). Shutdown unfreezes them."""
    with serve() as c:
        frozen = gc.get_freeze_count()
        walked = len(gc.get_objects())  # what a full pass walks: the frozen objects are not among them
        assert frozen > 50_000 and walked < frozen / 2, (frozen, walked)
        assert c.get("/health").status_code == 200
        text = c.get("/metrics").text
        assert _sample(text, "python_gc_collections_total", generation="2") >= 0
        assert _sample(text, "process_resident_memory_bytes") > 0
    assert gc.get_freeze_count() == 0


def _sample(text: str, name: str, **labels) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = re.escape(name) + (r"\{" + re.escape(want) + r"\}" if want else "") + r" (\S+)$"
    values = [float(m.group(1)) for line in text.splitlines() if (m := re.match(pattern, line))]
    assert values, f"{name}{{{want}}} not in metrics"
    return values[0]


def test_metrics_count_requests_and_latencies(client):
    before = client.get("/metrics").text
    client.post("/generate", json={"inputs": "Hello", "parameters": {"max_new_tokens": 3, "ignore_eos_token": True}})
    client.post("/generate", json={"inputs": "Hello", "parameters": {"adapter_id": "ghost"}})
    text = client.get("/metrics").text
    ok = _sample(text, "prompt_server_requests_total", route="/generate", adapter="none", status="200")
    # the soft-prompt and prefix caches report what they hold (gauges) and what they did (counters)
    assert "# TYPE prompt_server_engine_prefix_cache_bytes gauge" in text
    assert "# TYPE prompt_server_engine_prefix_cache_stored_total counter" in text
    assert "# TYPE prompt_server_engine_prompt_kv_bytes gauge" in text
    assert _sample(text, "prompt_server_engine_cache_relayouts_total") >= 0
    # where the engine's time goes, by kind of step (exported from the start; the values: tests/engine/test_engine.py)
    for kind in ("prefill", "decode_only"):
        assert f"# TYPE prompt_server_engine_{kind}_steps_total counter" in text
        assert f"# TYPE prompt_server_engine_{kind}_step_seconds_total counter" in text
    assert ok >= 1
    assert _sample(text, "prompt_server_requests_total", route="/generate", adapter="unknown", status="404") >= 1
    count = "prompt_server_time_to_first_token_seconds_count"
    assert _sample(text, count) == _sample(before, count) + 1
    assert _sample(text, "prompt_server_time_per_output_token_seconds_count") >= 1
    assert _sample(text, "prompt_server_queue_seconds_count") >= 1
    assert _sample(text, "prompt_server_engine_generated_tokens_total") >= 3
    assert _sample(text, "prompt_server_adapters_loaded") == 0  # this module's server has an empty store
    assert _sample(text, "prompt_server_batch_size_mean") >= 1
    for line in text.splitlines():  # every sample line is `name{labels} value`
        assert line.startswith("#") or re.match(r"^[a-z_]+(\{[^}]*\})? -?[0-9.e+-]+$", line), line


def test_metric_labels_name_only_adapters_that_exist(serve, tiny_llama_dir, tmp_path):
    _, adapter_dir = saved_peft(tiny_llama_dir, "prompt_tuning", tmp_path / "a")
    short = {"max_new_tokens": 2}
    with serve() as c:
        assert c.put("/adapters/known", files=upload_parts(adapter_dir)).status_code == 201
        assert c.post("/generate", json={"inputs": "Hi", "parameters": {"adapter_id": "known", **short}}).is_success
        assert c.post("/generate", json={"inputs": "Hi", "parameters": short}).is_success
        for i in range(3):  # ids nobody uploaded, refused for being unknown or for a bad parameter
            ghost = f"ghost-{i}"
            c.post("/generate", json={"inputs": "Hi", "parameters": {"adapter_id": ghost}})
            c.post("/generate", json={"inputs": "Hi", "parameters": {"adapter_id": ghost, "max_new_tokens": 10**6}})
            c.post("/generate_stream", json={"inputs": "Hi", "parameters": {"adapter_id": ghost}})
            c.post("/v1/completions", json={"model": ghost, "prompt": "Hi"})
            c.post("/classify", json={"inputs": "Hi", "adapter_id": ghost})
            c.get(f"/adapters/{ghost}")
            c.delete(f"/adapters/{ghost}")
        text = c.get("/metrics").text
    assert "ghost" not in text
    assert set(re.findall(r'adapter="([^"]*)"', text)) == {"known", "none", "unknown"}
    requests = "prompt_server_requests_total"
    assert _sample(text, requests, route="/generate", adapter="known", status="200") == 1
    assert _sample(text, requests, route="/adapters/{adapter_id}", adapter="known", status="201") == 1
    assert _sample(text, requests, route="/generate", adapter="unknown", status="404") == 3
    assert _sample(text, requests, route="/generate", adapter="unknown", status="422") == 3
    assert _sample(text, requests, route="/v1/completions", adapter="unknown", status="404") == 3
    assert _sample(text, "prompt_server_adapters_loaded") == 1


def test_histogram_buckets_are_cumulative():
    m = Metrics()
    for v in (0.003, 0.2, 7.0):
        m.observe_generation(queue=v, first_token=v, total=2 * v, prompt_tokens=5, generated=3)
    text = m.render({"queue_depth": 2, "steps": 4, "batch_size_sum": 10}, adapters_loaded=3)
    assert 'prompt_server_queue_seconds_bucket{le="0.005"} 1' in text
    assert 'prompt_server_queue_seconds_bucket{le="0.25"} 2' in text
    assert 'prompt_server_queue_seconds_bucket{le="+Inf"} 3' in text
    assert "prompt_server_batch_size_mean 2.5" in text
    assert "# TYPE prompt_server_engine_queue_depth gauge" in text
    assert "# TYPE prompt_server_engine_steps_total counter" in text


def test_stop_trimming():
    assert trim_at_stop("hello world", ["o w", "ld"]) == "hell"
    assert trim_at_stop("hello", ["x"]) == "hello"
    trimmer = StopTrimmer(["END"])
    out = [trimmer.push(t) for t in ("ab", "abE", "abEN", "abENx", "abENxyE", "abENxyEND")]
    assert out == ["ab", "", "", "ENx", "y", ""]
    assert trimmer.finish("abENxyEND") == ""
    trimmer = StopTrimmer(["END"])
    assert trimmer.push("abE") == "ab"
    assert trimmer.finish("abE") == "E"  # generation ended for another reason: the held-back tail is released


def test_the_http_layer_does_not_import_torch():
    code = "import sys, prompt_server.api; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
