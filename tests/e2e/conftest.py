"""A real uvicorn server on the tiny Llama, shared by the end-to-end tests of one module."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.e2e.server import run_server

LIMITS = ("--max-new-tokens", "500", "--max-input-tokens", "256", "--default-max-new-tokens", "8")


@pytest.fixture(scope="module")
def server(tiny_llama_dir, tmp_path_factory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("server")
    with run_server(tiny_llama_dir, root / "store", root / "server.log", *LIMITS) as url:
        yield url
