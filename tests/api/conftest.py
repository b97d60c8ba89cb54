"""In-process fixtures: the real app (lifespan, engine, registry) on the tiny Llama, driven by TestClient."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from prompt_server.config import Settings
from prompt_server.main import create_app

LIMITS = {"max_new_tokens": 512, "max_input_tokens": 256, "default_max_new_tokens": 8, "max_stop_sequences": 4}


@pytest.fixture(scope="session")
def serve(tiny_llama_dir: Path, tmp_path_factory) -> Callable:
    """serve(**settings) -> a context manager yielding a TestClient whose lifespan ran."""

    @contextmanager
    def _serve(**overrides) -> Iterator[TestClient]:
        store = overrides.pop("adapters", None) or tmp_path_factory.mktemp("store")
        settings = Settings(model=str(tiny_llama_dir), adapters=store, **{**LIMITS, **overrides})
        with TestClient(create_app(settings), raise_server_exceptions=False) as client:
            yield client

    return _serve


@pytest.fixture(scope="module")
def client(serve) -> Iterator[TestClient]:
    with serve() as c:
        yield c
