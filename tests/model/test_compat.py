"""Model directories as transformers 4.x and 5.x write them, the serving plan, the start-up self-check, and the
directories the server must refuse rather than serve differently from transformers."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from prompt_server.engine.types import GenerateRequest
from prompt_server.model import forward
from prompt_server.model.compat import plan
from prompt_server.model.loader import ModelLoadError, load_model
from prompt_server.model.selfcheck import SelfCheckFailed, check_runner, probe_ids, reference_logits
from tests.engine.conftest import build_world, run_engine
from tests.tiny import VARIANTS, resave_as_transformers_4, save_tiny_arch

PROMPTS = ["the cat sat on the mat", "Hello world! How are you today?"]
ROPE = {"rope_type": "default", "rope_theta": 50000.0}


@pytest.fixture(scope="module")
def v5_dir(tmp_path_factory) -> Path:
    return save_tiny_arch("llama", tmp_path_factory.mktemp("v5"), rope_parameters=ROPE)


def _serve_all(world) -> list[tuple[list[int], list[float]]]:
    """Every adapter kind and a plain row, in one batch: token ids and their logprobs."""
    cases = [(a, p) for a in (None, *VARIANTS) for p in PROMPTS]

    async def go(engine):
        handles = [engine.submit(GenerateRequest(prompt=p, adapter_id=a, max_new_tokens=8, ignore_eos=True))
                   for a, p in cases]
        return [await h.result() for h in handles]

    return [([t.id for t in r.tokens], [t.logprob for t in r.tokens]) for r in run_engine(world, go)]


@pytest.mark.parametrize("tokenizer", ["fast", "gpt2"])
def test_a_model_saved_by_transformers_4_serves_exactly_like_its_5_save(v5_dir, tmp_path, tokenizer):
    v4_dir = resave_as_transformers_4(v5_dir, tmp_path / "v4", tokenizer)
    config = json.loads((v4_dir / "config.json").read_text())
    assert "rope_parameters" not in config and config["rope_theta"] == ROPE["rope_theta"]
    v4 = build_world(v4_dir, tmp_path / "a4")
    v5 = build_world(v5_dir, tmp_path / "a5")
    assert v4.loaded.model.config.rope_parameters == ROPE  # 4.x's top-level rope_theta is read, not defaulted
    for text in PROMPTS:
        assert v4.loaded.tokenizer(text).input_ids == v5.loaded.tokenizer(text).input_ids
    served4, served5 = _serve_all(v4), _serve_all(v5)
    assert [ids for ids, _ in served4] == [ids for ids, _ in served5]
    # same weights, same reading: logprobs agree to float32 summation order
    assert torch.allclose(torch.tensor([lp for _, lp in served4]), torch.tensor([lp for _, lp in served5]), atol=1e-5)


def test_the_rotary_base_read_from_a_4x_config_is_the_one_that_counts(v5_dir, tmp_path):
    # the control for the test above: a different rope_theta does change the logits, so equal outputs mean it was read
    other = resave_as_transformers_4(v5_dir, tmp_path / "other")
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "rope_theta": 10000.0}))
    a, b = (load_model(d, device="cpu", progress=False) for d in (v5_dir, other))
    ids = probe_ids(a.spec.vocab_size, 48, torch.device("cpu"))
    assert not torch.allclose(reference_logits(a.model, ids), reference_logits(b.model, ids), atol=1e-3)


def test_llama3_rope_scaling_is_served_on_the_lean_path_like_peft(tmp_path):
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
    world = build_world(save_tiny_arch("llama", tmp_path / "m", rope_parameters=rope), tmp_path / "a")
    assert world.loaded.plan.forward_path == "lean"
    assert world.loaded.model.model.rotary_emb.rope_type == "llama3"
    cases = [(a, p) for a in (None, *VARIANTS) for p in PROMPTS]
    for (adapter_id, prompt), (ids, _) in zip(cases, _serve_all(world)):
        assert ids == world.oracle(adapter_id, prompt, 8), (adapter_id, prompt)


def test_longrope_caps_the_context_where_the_short_factors_apply(tmp_path):
    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 8, "long_factor": [4.0] * 8,
            "original_max_position_embeddings": 64}
    path = save_tiny_arch("phi3", tmp_path / "m", rope_parameters=rope, original_max_position_embeddings=64)
    loaded = load_model(path, device="cpu", progress=False)
    assert loaded.plan.forward_path == "generic" and loaded.plan.max_position == 64
    assert "original_max_position_embeddings 64" in loaded.plan.notes[0]


def test_a_generic_family_with_a_sliding_window_is_refused(tmp_path):
    path = save_tiny_arch("phi3", tmp_path / "m", sliding_window=32)
    with pytest.raises(ModelLoadError, match=r"sliding_window 32.*model_type 'phi3' is not one of"):
        load_model(path, device="cpu", progress=False)


def test_the_lean_path_proves_itself_against_the_models_own_forward(v5_dir):
    loaded = load_model(v5_dir, device="cpu", progress=False)
    runner = forward.make_runner(loaded.model, "lean")
    assert check_runner(runner, loaded.model, loaded.spec.vocab_size, 0, 512) < 1e-5
    runner.rotary = type(runner.rotary)(config=_with_rope_theta(loaded.model.config, 10000.0))  # a misread base
    with pytest.raises(SelfCheckFailed, match="LlamaRunner differs from the model's own forward"):
        check_runner(runner, loaded.model, loaded.spec.vocab_size, 0, 512)


def test_a_lean_path_that_disagrees_falls_back_to_the_generic_one(v5_dir, monkeypatch):
    init = forward.LlamaRunner.__init__

    def forgetful(self, model, *args, **kwargs):
        init(self, model, *args, **kwargs)
        self.apply_rotary = lambda q, k, cos, sin: (q, k)  # rotary forgotten

    monkeypatch.setattr(forward.LlamaRunner, "__init__", forgetful)
    loaded = load_model(v5_dir, device="cpu", progress=False)
    assert loaded.plan.forward_path == "generic"
    assert "lean self-check failed" in loaded.plan.reason


def test_a_model_no_path_reproduces_is_not_served(v5_dir, monkeypatch):
    monkeypatch.setattr(forward.Runner, "logits", lambda self, hidden: self.lm_head(hidden).float() + 1.0)
    with pytest.raises(ModelLoadError, match="not served: HFRunner differs from the model's own forward"):
        load_model(v5_dir, device="cpu", progress=False)


def _with_rope_theta(config, theta: float):
    other = type(config).from_dict(config.to_dict())
    other.rope_parameters = {**other.rope_parameters, "rope_theta": theta}
    return other


def _edit_config(src: Path, dst: Path, **fields) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**config, **fields}))
    return dst


@pytest.mark.parametrize("fields, message", [
    ({"transformers_version": "6.1.0"},
     r"config.json: transformers_version 6.1.0 is a newer major release .* re-save the model"),
    ({"rope_theta": 10000.0},
     r"config.json: rope_theta 10000.0 disagrees with rope_parameters.rope_theta 50000.0; keep one of them"),
])
def test_a_config_transformers_could_misread_stops_start_up(v5_dir, tmp_path, fields, message):
    with pytest.raises(ModelLoadError, match=message):
        load_model(_edit_config(v5_dir, tmp_path / "m", **fields), device="cpu", progress=False)


def test_an_unloadable_tokenizer_names_the_directory_and_the_remedy(v5_dir, tmp_path):
    bad = tmp_path / "m"
    shutil.copytree(v5_dir, bad)
    (bad / "tokenizer.json").unlink()
    config = json.loads((bad / "tokenizer_config.json").read_text())
    (bad / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": "NoSuchTokenizer"}))
    (bad / "vocab.json").write_text("{}")
    with pytest.raises(ModelLoadError, match=rf"could not load the tokenizer from {bad}: .*re-save the tokenizer"):
        load_model(bad, device="cpu", progress=False)


def test_serve_refuses_a_misread_model_in_one_line(v5_dir, tmp_path):
    bad = _edit_config(v5_dir, tmp_path / "m", transformers_version="6.0.0")
    proc = subprocess.run([sys.executable, "-m", "prompt_server.cli", "serve", "--model", str(bad), "--device",
                           "cpu", "--port", "9"], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {bad}/config.json: transformers_version 6.0.0"), lines


def test_plan_for_the_lean_families_keeps_the_whole_context(v5_dir):
    loaded = load_model(v5_dir, device="cpu", progress=False)
    # the loader adds the CPU attention kernel to the plan (model/native.py)
    assert dataclasses.replace(plan(loaded.model), native_kernels=True) == loaded.plan
    assert (loaded.plan.forward_path, loaded.plan.max_position, loaded.plan.notes) == ("lean", 512, ())
    assert plan(loaded.model, lean=False).forward_path == "generic"
