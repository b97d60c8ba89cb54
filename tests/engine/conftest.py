"""A tiny model with one adapter of every kind, its PEFT twins as the oracle, and an engine over them."""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from prompt_server.adapters.registry import AdapterRegistry
from prompt_server.config import Settings
from prompt_server.engine.engine import Engine
from prompt_server.model.loader import LoadedModel, load_model
from tests.tiny import VARIANTS, make_peft, save_peft

# Where build_world (and the encoder-decoder and encoder tests' fixtures) load the server's model when a test names no
# device: PROMPT_SERVER_TEST_DEVICE=cuda runs those engine tests on the GPU, build_world's against PEFT on the GPU, the
# others against PEFT on the CPU (scripts/gpu_check.sh).
TEST_DEVICE = os.environ.get("PROMPT_SERVER_TEST_DEVICE", "cpu")


@dataclass
class World:
    loaded: LoadedModel
    registry: AdapterRegistry
    peft: dict  # adapter id -> PeftModel
    dirs: dict  # adapter id -> saved PEFT directory

    def oracle(self, adapter_id: str | None, prompt: str, n: int) -> list[int]:
        """Greedy tokens PeftModel (or the bare model) generates for this request alone."""
        tok = self.loaded.tokenizer
        ids = tok(prompt, return_tensors="pt").input_ids.to(self.loaded.device)
        model = self.peft[adapter_id] if adapter_id else self.loaded.model
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                 do_sample=False, eos_token_id=None, pad_token_id=tok.pad_token_id)
        return out[0, ids.shape[1]:].tolist()


    def check_logprobs(self, adapter_id: str | None, prompt: str, result) -> None:
        """A served result's tokens are PEFT's greedy ones and their log-probabilities within 1e-4 of PEFT's,
        teacher-forced on the served tokens."""
        prompt_ids = self.loaded.tokenizer(prompt).input_ids
        chosen = [t.id for t in result.tokens]
        assert chosen == self.oracle(adapter_id, prompt, len(chosen)), adapter_id
        ids = torch.tensor([prompt_ids + chosen], device=self.loaded.device)
        model = self.peft[adapter_id] if adapter_id else self.loaded.model
        with torch.inference_mode():
            logits = model(input_ids=ids).logits[0, -ids.shape[1]:].log_softmax(-1)
        expected = logits[len(prompt_ids) - 1 : -1].gather(-1, ids[0, len(prompt_ids):, None]).squeeze(-1).cpu()
        torch.testing.assert_close(torch.tensor([t.logprob for t in result.tokens]), expected, atol=1e-4, rtol=0)


def put_dir(registry: AdapterRegistry, adapter_id: str, path: Path, labels=None):
    files = {f.name: f.read_bytes() for f in path.iterdir() if f.is_file()}
    return registry.put(adapter_id, files, labels)


def build_world(model_dir: Path, tmp: Path, device: str | None = None, dtype: str = "float32") -> World:
    loaded = load_model(model_dir, device=device or TEST_DEVICE, dtype=dtype, progress=False)
    registry = AdapterRegistry(loaded.spec, device=loaded.device, dtype=loaded.dtype)
    peft, dirs = {}, {}
    for i, variant in enumerate(VARIANTS):
        pm = make_peft(model_dir, variant, seed=i, num_virtual_tokens=3 + i)
        dirs[variant] = save_peft(pm, tmp / variant)
        put_dir(registry, variant, dirs[variant])
        peft[variant] = pm.to(device=loaded.device, dtype=loaded.dtype)
    return World(loaded, registry, peft, dirs)


@pytest.fixture(scope="session")
def llama_world(tiny_llama_dir, tmp_path_factory) -> World:
    return build_world(tiny_llama_dir, tmp_path_factory.mktemp("llama-adapters"))


@pytest.fixture(scope="session")
def gpt2_world(tiny_gpt2_dir, tmp_path_factory) -> World:
    return build_world(tiny_gpt2_dir, tmp_path_factory.mktemp("gpt2-adapters"))


@pytest.fixture(params=["llama", "gpt2"])
def world(request) -> World:
    return request.getfixturevalue(f"{request.param}_world")


def run_engine(world: World, coro_fn, **settings):
    """Start an engine on the world, run `coro_fn(engine)` to completion on a fresh loop, stop the engine."""
    engine = Engine(world.loaded, world.registry, Settings(**settings))
    engine.start()
    try:
        return asyncio.run(coro_fn(engine))
    finally:
        engine.stop()
