"""docker/Dockerfile, which no test here can build (no Docker engine): hadolint's lint, and what the docs promise
of it: CPU by default and CUDA by a build argument, a non-root user, a HEALTHCHECK on /health, configuration
through environment variables only, and a build context that holds what it copies."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.deploy.conftest import DOCKER, REPO, setting_env_names

DOCKERFILE = DOCKER / "Dockerfile"
HADOLINT = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(line for line in DOCKERFILE.read_text().splitlines()
                                         if not line.lstrip().startswith("#")))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in text.splitlines() if line.strip()]


@pytest.mark.skipif(not Path(HADOLINT).is_file(), reason="hadolint is not installed (the test extra installs it)")
def test_hadolint_passes():
    result = subprocess.run([HADOLINT, "--no-color", str(DOCKERFILE)], check=False, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_device_argument_picks_the_torch_build():
    steps = _instructions()
    args = {a.split("=")[0]: a.split("=", 1)[1] if "=" in a else None for i, a in steps if i == "ARG"}
    assert args["DEVICE"] == "cpu"
    install = next(a for i, a in steps if i == "RUN" and "torch==" in a)
    assert re.search(r"cpu\) index=https://download\.pytorch\.org/whl/cpu", install)
    assert re.search(r"cuda\) index=https://download\.pytorch\.org/whl/cu\d+", install)
    assert "exit 1" in install  # any other DEVICE stops the build
    # the server is told to use the device the image was built for (auto would fall back to the CPU unseen)
    assert "PROMPT_SERVER_DEVICE=${DEVICE}" in " ".join(a for i, a in steps if i == "ENV")


def test_runs_as_a_numeric_non_root_user_with_a_healthcheck_and_env_config():
    steps = _instructions()
    user = [a for i, a in steps if i == "USER"]
    assert user and re.fullmatch(r"[1-9]\d*(:[1-9]\d*)?", user[-1])
    health = " ".join(a for i, a in steps if i == "HEALTHCHECK")
    assert "http://127.0.0.1:8000/health" in health
    env = " ".join(a for i, a in steps if i == "ENV")
    named = set(re.findall(r"(PROMPT_SERVER_\w+)=", env))
    assert named <= setting_env_names() and "PROMPT_SERVER_PORT" in named
    assert re.search(r"PROMPT_SERVER_PORT=8000\b", env) and "EXPOSE" in dict(steps) and dict(steps)["EXPOSE"] == "8000"
    cmd = [a for i, a in steps if i == "CMD"]
    assert cmd[-1] == '["prompt-server", "serve"]'  # no flags: everything comes from the environment


def test_what_it_copies_is_in_the_build_context():
    ignored = [line.strip() for line in (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    for instruction, args in _instructions():
        if instruction != "COPY":
            continue
        sources = [a for a in args.split() if not a.startswith("--")][:-1]
        for source in sources:
            assert (REPO / source).exists(), source
            assert source.rstrip("/") not in ignored, f"{source} is copied but excluded from the context"
