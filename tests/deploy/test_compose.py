"""docker/compose.yaml and its GPU variant: valid against the Compose Specification's JSON schema (offline, the copy
check-jsonschema ships), and wired as the docs say: replicas behind nginx on named volumes, the admin key required,
healthchecks gating nginx, a GPU reserved per replica in the variant."""

from __future__ import annotations

import json
import re
from importlib import resources

import jsonschema
import pytest
import yaml

from tests.deploy.conftest import DOCKER, REPO, setting_env_names

FILES = ("compose.yaml", "compose.gpu.yaml")


def _schema() -> dict:
    text = resources.files("check_jsonschema.builtin_schemas.vendor").joinpath("compose-spec.json").read_text()
    return json.loads(text)


def _load(name: str) -> dict:
    return yaml.safe_load((DOCKER / name).read_text())


@pytest.mark.parametrize("name", FILES)
def test_compose_file_is_valid_against_the_compose_spec(name):
    schema = _schema()
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = sorted(validator.iter_errors(_load(name)), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)


@pytest.mark.parametrize(("where", "value"), [
    (("services", "prompt-server", "healthcheck", "interval"), ["10s"]),
    (("services", "nginx", "depends_on", "prompt-server", "condition"), "service_happy"),
    (("services", "prompt-server", "deploy", "resources", "reservations", "gpus"), 1),
])
def test_the_schema_check_can_fail(where, value):
    schema = _schema()
    bad = _load("compose.yaml")
    node = bad
    for key in where[:-1]:
        node = node.setdefault(key, {})
    node[where[-1]] = value
    assert list(jsonschema.validators.validator_for(schema)(schema).iter_errors(bad))


def test_replicas_behind_nginx_with_volumes_keys_and_healthchecks():
    compose = _load("compose.yaml")
    server, nginx = compose["services"]["prompt-server"], compose["services"]["nginx"]
    # built from the repository root with the Dockerfile beside this file
    assert (DOCKER / server["build"]["context"] / server["build"]["dockerfile"]).resolve() == DOCKER / "Dockerfile"
    assert re.fullmatch(r"\$\{PROMPT_SERVER_REPLICAS:-\d+\}", str(server["deploy"]["replicas"]))
    # the admin key comes from the environment and the stack refuses to start without it
    assert re.fullmatch(r"\$\{PROMPT_SERVER_ADMIN_KEY:\?[^}]+\}", server["environment"]["PROMPT_SERVER_ADMIN_KEY"])
    assert set(server["environment"]) <= setting_env_names()
    # named volumes for the adapter store and the model cache, where the image puts them
    dockerfile = (DOCKER / "Dockerfile").read_text()
    for volume, env in (("adapters", "PROMPT_SERVER_ADAPTERS"), ("models", "PROMPT_SERVER_CACHE_DIR")):
        path = re.search(rf"{env}=(\S+)", dockerfile).group(1)
        assert f"{volume}:{path}" in server["volumes"] and volume in compose["volumes"]
    assert "/health" in " ".join(server["healthcheck"]["test"])
    assert nginx["depends_on"]["prompt-server"]["condition"] == "service_healthy"
    assert "/health" in " ".join(nginx["healthcheck"]["test"])
    # nginx renders the template the replica test runs (tests/e2e/test_replicas.py)
    source = nginx["volumes"][0].split(":")[0]
    assert (DOCKER / source / "default.conf.template").is_file()


def test_gpu_variant_reserves_a_gpu_per_replica_and_builds_the_cuda_image():
    base, gpu = _load("compose.yaml"), _load("compose.gpu.yaml")
    assert set(gpu["services"]) <= set(base["services"])  # it only overrides
    server = gpu["services"]["prompt-server"]
    assert server["build"]["args"]["DEVICE"] == "cuda" and server["image"].endswith(":cuda")
    devices = server["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert set(server.get("environment", {})) <= setting_env_names()


def test_the_docs_name_the_compose_files_that_exist():
    readme = (REPO / "README.md").read_text()
    for name in FILES:
        assert f"docker/{name}" in readme
    assert "docker-compose.yml" not in readme
