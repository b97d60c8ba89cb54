"""Session fixtures: tiny models written once per test session, and the real default model for slow tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.tiny import save_tiny_model

# Servers and engines the tests start run on the CPU in float32, where PEFT parity is exact, also on a machine with a
# GPU ("auto" would pick it); the CUDA tests (tests/engine/test_cuda.py) ask for the GPU by name.
os.environ.setdefault("PROMPT_SERVER_DEVICE", "cpu")


@pytest.fixture(autouse=True)
def no_tf32():
    """Float32 parity on a GPU needs true float32 in every product, PEFT's included: TF32 rounds to 10 mantissa bits.
    torch leaves it off for matrix products but on for cuDNN, which runs PEFT's P-tuning LSTM on CUDA (the server
    collapses that encoder on the CPU, in float32). With it on, the engine tests on an H200 found the oracle's keys
    for a P-tuning LSTM adapter up to 3.5e-4 off the server's, and log-probabilities up to 1.6e-4 off, in the tests
    whose adapters include one. Nothing changes on the CPU."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


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
