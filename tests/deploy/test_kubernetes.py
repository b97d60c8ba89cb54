"""deploy/kubernetes: the kustomize base (CPU) and GPU overlay, rendered by kustomize and every object validated
against the Kubernetes JSON schemas offline (kubernetes-validate, strict: unknown fields fail), then checked for
what the docs promise: probes on /health, the adapter store on a ReadWriteMany claim, the keys from the generated
Secret, an autoscaler on a metric the server really exports, one GPU per replica in the overlay."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from fastapi.testclient import TestClient

from tests.deploy.conftest import KUBERNETES, REPO, setting_env_names

K8S_VERSION = "1.31.0"  # the oldest Kubernetes release still in wide use that these manifests target
ADMIN_KEY, API_KEY = "test-admin-key", "test-api-key"


def _kustomize() -> list[str] | None:
    """A kustomize to render with: $PROMPT_SERVER_KUSTOMIZE, the one `make tools` fetches, one on PATH, kubectl's."""
    for candidate in (os.environ.get("PROMPT_SERVER_KUSTOMIZE"), REPO / ".cache" / "tools" / "kustomize",
                      shutil.which("kustomize")):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return [str(candidate), "build"]
    kubectl = shutil.which("kubectl")
    return [kubectl, "kustomize"] if kubectl else None


KUSTOMIZE = _kustomize()
needs_kustomize = pytest.mark.skipif(KUSTOMIZE is None, reason="no kustomize (`make test` fetches one into .cache)")


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """A copy of deploy/kubernetes with keys.env made from the example, as the docs tell a user to."""
    root = tmp_path_factory.mktemp("k8s") / "kubernetes"
    shutil.copytree(KUBERNETES, root, ignore=shutil.ignore_patterns("keys.env"))
    example = (root / "base" / "keys.env.example").read_text()
    assert "admin-key=" in example
    (root / "base" / "keys.env").write_text(f"admin-key={ADMIN_KEY}\napi-key={API_KEY}\n")
    return root


def _render(tree: Path, variant: str) -> list[dict]:
    assert KUSTOMIZE is not None
    path = tree / ("base" if variant == "cpu" else "overlays/gpu")
    out = subprocess.run([*KUSTOMIZE, str(path)], check=False, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def _one(objects: list[dict], kind: str) -> dict:
    found = [o for o in objects if o["kind"] == kind]
    assert len(found) == 1, (kind, [o["kind"] for o in objects])
    return found[0]


def _validate(obj: dict) -> None:
    try:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        pytest.fail(f"{obj['kind']} {obj['metadata']['name']}: {e.message} at {'/'.join(map(str, e.path))}")


@needs_kustomize
@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_every_rendered_object_is_valid_kubernetes(tree, variant):
    objects = _render(tree, variant)
    assert sorted(o["kind"] for o in objects) == [
        "Deployment", "HorizontalPodAutoscaler", "PersistentVolumeClaim", "Secret", "Service"]
    for obj in objects:
        _validate(obj)


def test_the_validation_can_fail():
    deployment = yaml.safe_load((KUBERNETES / "base" / "deployment.yaml").read_text())
    _validate(deployment)  # the raw file is a whole object too
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["pth"] = "/health"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


@needs_kustomize
def test_base_wires_probes_store_keys_and_service(tree):
    objects = _render(tree, "cpu")
    deployment, service, claim, secret = (_one(objects, k) for k in
                                          ("Deployment", "Service", "PersistentVolumeClaim", "Secret"))
    pod = deployment["spec"]["template"]
    container = pod["spec"]["containers"][0]
    assert container["image"] == "prompt-server:cpu"
    port = {p["name"]: p["containerPort"] for p in container["ports"]}["http"]
    assert port == 8000  # the image's PROMPT_SERVER_PORT
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": "http"}, probe
    assert container["resources"]["requests"]["cpu"] and container["resources"]["requests"]["memory"]
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True and pod["spec"]["securityContext"]["fsGroup"]
    env = {e["name"]: e for e in container["env"]}
    assert set(env) <= setting_env_names()  # configuration through the server's own variables only
    # the adapter store: the claim, ReadWriteMany, mounted where PROMPT_SERVER_ADAPTERS points
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    volume = next(v for v in pod["spec"]["volumes"] if v["persistentVolumeClaim"]["claimName"] ==
                  claim["metadata"]["name"])
    mount = next(m for m in container["volumeMounts"] if m["name"] == volume["name"])
    assert mount["mountPath"] == env["PROMPT_SERVER_ADAPTERS"]["value"]
    # the keys: from the generated Secret (its name carries kustomize's hash), the API key optional
    admin = env["PROMPT_SERVER_ADMIN_KEY"]["valueFrom"]["secretKeyRef"]
    api = env["PROMPT_SERVER_API_KEY"]["valueFrom"]["secretKeyRef"]
    assert admin["name"] == api["name"] == secret["metadata"]["name"] != "prompt-server-keys"
    assert set(secret["data"]) == {"admin-key", "api-key"} and api.get("optional") is True
    # the Service reaches the pods on their http port
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert service["spec"]["ports"][0]["targetPort"] == "http"


@needs_kustomize
def test_autoscaler_scales_the_deployment_on_a_metric_the_server_exports(tree, serve_tiny):
    objects = _render(tree, "cpu")
    hpa, deployment = _one(objects, "HorizontalPodAutoscaler"), _one(objects, "Deployment")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": deployment["metadata"]["name"]}
    pods = [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    assert pods
    exported = serve_tiny.get("/metrics").text
    for name in pods:
        assert f"\n{name} " in exported, f"{name} is not on /metrics"
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/path"] == "/metrics"


@needs_kustomize
def test_gpu_overlay_asks_one_gpu_per_replica_and_the_cuda_image(tree):
    objects = _render(tree, "gpu")
    deployment = _one(objects, "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "prompt-server:cuda"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert container["resources"]["requests"]["nvidia.com/gpu"] == "1"
    tolerations = deployment["spec"]["template"]["spec"]["tolerations"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in tolerations
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["PROMPT_SERVER_THREADS"] == "4"  # the patch replaced the setting it meant to
    hpa = _one(objects, "HorizontalPodAutoscaler")
    assert [m["type"] for m in hpa["spec"]["metrics"]] == ["Pods"]


def test_keys_are_never_committed():
    ignored = subprocess.run(["git", "check-ignore", "-q", str(KUBERNETES / "base" / "keys.env")], check=False,
                             cwd=REPO)
    assert ignored.returncode == 0, "deploy/kubernetes/base/keys.env must be ignored by git"


@pytest.fixture(scope="module")
def serve_tiny(tiny_llama_dir, tmp_path_factory):
    from prompt_server.config import Settings
    from prompt_server.main import create_app

    settings = Settings(model=str(tiny_llama_dir), adapters=tmp_path_factory.mktemp("store"))
    with TestClient(create_app(settings)) as client:
        client.post("/generate", json={"inputs": "hi", "parameters": {"max_new_tokens": 1}})
        yield client
