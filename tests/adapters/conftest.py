"""Fixtures for adapter tests: the tiny Llama's spec and PEFT-written adapter files as upload dicts."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoConfig

from prompt_server.adapters.types import ModelSpec
from tests.tiny import make_peft, save_peft


def dir_files(path: Path) -> dict[str, bytes]:
    """The adapter files PEFT wrote, as an upload would carry them (model card left out)."""
    return {p.name: p.read_bytes() for p in path.iterdir() if p.name != "README.md"}


@pytest.fixture(scope="session")
def llama_spec(tiny_llama_dir) -> ModelSpec:
    return ModelSpec.from_config(AutoConfig.from_pretrained(tiny_llama_dir))


@pytest.fixture(scope="session")
def peft_files(tiny_llama_dir, tmp_path_factory):
    """Factory: (variant, seed, task_type, fmt) -> {file name: bytes} of a PEFT-saved adapter on the tiny Llama."""
    cache: dict[tuple, dict[str, bytes]] = {}

    def make(variant: str = "prompt_tuning", seed: int = 0, task_type: str = "CAUSAL_LM", fmt: str = "safetensors"):
        key = (variant, seed, task_type, fmt)
        if key not in cache:
            peft = make_peft(tiny_llama_dir, variant, task_type=task_type, seed=seed)
            cache[key] = dir_files(save_peft(peft, tmp_path_factory.mktemp(variant), fmt=fmt))
        return dict(cache[key])

    return make
