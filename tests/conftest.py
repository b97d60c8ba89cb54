"""Session fixtures: tiny models written once per test session, and the real default model for slow tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.tiny import save_tiny_model

# Servers and engines the tests start run on the CPU in float32, where PEFT parity is exact, also on a machine with a
# GPU ("auto" would pick it); the CUDA tests (tests/engine/test_cuda.py) ask for the GPU by name.
os.environ.setdefault("PROMPT_SERVER_DEVICE", "cpu")


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return save_tiny_model("llama", tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory) -> Path:
    return save_tiny_model("gpt2", tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    from prompt_server.model.default import ensure_default_model

    return ensure_default_model(progress=False)
