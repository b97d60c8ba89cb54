"""The text-generation and lorax-client packages, run in their own virtual environment.

Both clients pin huggingface-hub below 1.0 while transformers 5 needs 1.x or later, so they cannot share the
server's environment; users run them in theirs anyway. `make test` builds `.venv-clients` and names its python in
PROMPT_SERVER_TEST_CLIENTS_PYTHON. The tests call `run_clients`, which runs this file there as a script: it reads a
JSON job on stdin, does it with the real client packages and prints a JSON answer (stdlib and clients only).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ENV = "PROMPT_SERVER_TEST_CLIENTS_PYTHON"


def clients_python() -> str:
    """The clients' interpreter; tests skip only when the variable is unset (a plain `pytest` run)."""
    import pytest

    python = os.environ.get(ENV)
    if not python:
        pytest.skip(f"{ENV} is not set: `make test` creates the text-generation / lorax-client venv and sets it")
    if not Path(python).is_file():
        pytest.fail(f"{ENV}={python} does not exist; run `make clients`")
    return python


def run_clients(job: str, **payload: Any) -> Any:
    """Run `job` with the real client packages; -> its JSON answer. A client exception fails the test with it."""
    proc = subprocess.run(
        [clients_python(), __file__, job], input=json.dumps(payload), capture_output=True, text=True, timeout=120,
        check=False,
    )
    assert proc.returncode == 0, f"{job} failed in the clients' venv:\n{proc.stderr}"
    return json.loads(proc.stdout)


# ---- the clients' side: runs in the clients' venv ------------------------------------------------------------


def _parse(payload: dict) -> dict:
    """Parse every body with both clients' own response models (a mismatch raises)."""
    import lorax.types as lx
    import text_generation.types as tg

    for body in payload.get("responses", []):
        tg.Response(**body)
        lx.Response(**body)
    for event in payload.get("stream_events", []):
        tg.StreamResponse(**event)
        lx.StreamResponse(**event)
    return {"parsed": len(payload.get("responses", [])) + len(payload.get("stream_events", []))}


def _parameters(payload: dict) -> dict:
    """What each client sends as `parameters` for max_new_tokens=3, details=True (its null fields included)."""
    import lorax.types as lx
    import text_generation.types as tg

    return {
        "tgi": tg.Parameters(max_new_tokens=3, details=True).model_dump(by_alias=True),
        "lorax": lx.Parameters(max_new_tokens=3, details=True).model_dump(by_alias=True),
    }


def _generate(payload: dict) -> dict:
    """One client's generate, generate_stream and a refused request against a live server."""
    if payload["client"] == "lorax":
        from lorax import Client
        from lorax.errors import NotFoundError, ValidationError
    else:
        from text_generation import Client
        from text_generation.errors import NotFoundError, ValidationError

    client = Client(payload["url"])
    kwargs = payload.get("kwargs", {})
    response = client.generate(payload["prompt"], **kwargs)
    stream_kwargs = {k: v for k, v in kwargs.items() if k not in ("details", "decoder_input_details")}
    streamed = list(client.generate_stream(payload["prompt"], **stream_kwargs))
    errors = {}
    for name, bad in payload.get("bad", {}).items():
        try:
            client.generate(payload["prompt"], **bad)
            errors[name] = None
        except (NotFoundError, ValidationError) as exc:
            errors[name] = {"type": type(exc).__name__, "message": str(exc)}
    return {
        "response": response.model_dump(),
        "stream": [event.model_dump() for event in streamed],
        "errors": errors,
    }


def main() -> None:
    jobs = {"parse": _parse, "parameters": _parameters, "generate": _generate}
    payload = json.loads(sys.stdin.read() or "{}")
    print(json.dumps(jobs[sys.argv[1]](payload), default=str))


if __name__ == "__main__":
    main()
