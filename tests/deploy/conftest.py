"""Shared helpers of the deployment tests: the repository's deployment files and the settings they may name."""

from __future__ import annotations

from pathlib import Path

from prompt_server.config import Settings

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
KUBERNETES = REPO / "deploy" / "kubernetes"


def setting_env_names() -> set[str]:
    """Every environment variable the server reads: PROMPT_SERVER_<FIELD>."""
    return {f"PROMPT_SERVER_{name.upper()}" for name in Settings.model_fields}
