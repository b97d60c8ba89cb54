"""Two servers sharing one adapter store behind nginx, configured by the very template compose uses
(docker/nginx/templates/default.conf.template): an upload, a replace and a delete through the proxy are served the
same way by every replica within REPLICA_AGREEMENT seconds, each timed."""

from __future__ import annotations

import re
import shutil
import string
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import yaml

from prompt_server.client import AdminClient
from tests.api.oracle import peft_greedy, saved_peft
from tests.e2e.conftest import LIMITS
from tests.e2e.server import free_port, run_server, stop, wait_healthy

REPO = Path(__file__).resolve().parents[2]
TEMPLATE = REPO / "docker" / "nginx" / "templates" / "default.conf.template"
COMPOSE = REPO / "docker" / "compose.yaml"
NGINX = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if Path(p).is_file()),
                                      None)
PROMPT = "Once upon a time"
ADMIN_KEY = "replica-test-admin-key"
REPLICA_AGREEMENT = 2.0  # seconds within which every replica serves what one replica wrote

# What the nginx image's own nginx.conf gives the template (it is included in its http block), with the paths a
# test process may write to.
MAIN = """
worker_processes 1;
daemon off;
pid {root}/nginx.pid;
error_log {root}/error.log warn;
events {{ worker_connections 64; }}
http {{
    access_log {root}/access.log;
    client_body_temp_path {root}/body;
    proxy_temp_path {root}/proxy;
    fastcgi_temp_path {root}/fastcgi;
    uwsgi_temp_path {root}/uwsgi;
    scgi_temp_path {root}/scgi;
    include {root}/conf.d/*.conf;
}}
"""


def render_template(variables: dict[str, str]) -> str:
    """The template as the nginx image's entrypoint renders it: envsubst of the variables it is given, nginx's
    own `$host`-style variables left alone; every `${...}` in the template must be one of them."""
    text = TEMPLATE.read_text()
    wanted = set(re.findall(r"\$\{(\w+)\}", text))
    assert wanted == set(variables), f"the template uses {sorted(wanted)}, the test gives {sorted(variables)}"
    return string.Template(text).safe_substitute(variables)


def test_compose_gives_nginx_every_template_variable():
    nginx = yaml.safe_load(COMPOSE.read_text())["services"]["nginx"]
    render_template({k: str(v) for k, v in nginx["environment"].items()})
    assert "./nginx/templates:/etc/nginx/templates:ro" in nginx["volumes"]


def _until(check: Callable[[], bool], what: str) -> float:
    """Seconds until check() holds (polled), failing after REPLICA_AGREEMENT."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > REPLICA_AGREEMENT:
            pytest.fail(f"replicas did not agree within {REPLICA_AGREEMENT} s: {what}")
        time.sleep(0.01)
    return time.monotonic() - start


def _tokens(url: str, body: dict) -> list[int] | int:
    r = httpx.post(f"{url}/generate", json=body, timeout=60)
    return [t["id"] for t in r.json()["details"]["tokens"]] if r.status_code == 200 else r.status_code


@pytest.mark.skipif(NGINX is None, reason="the nginx binary is not installed (`make test` installs it)")
def test_writes_through_the_proxy_are_served_by_every_replica(tiny_llama_dir, tmp_path):
    store = tmp_path / "store"
    flags = (*LIMITS, "--admin-key", ADMIN_KEY)
    with run_server(tiny_llama_dir, store, tmp_path / "a.log", *flags) as url_a, \
            run_server(tiny_llama_dir, store, tmp_path / "b.log", *flags) as url_b:
        port = free_port()
        root = tmp_path / "nginx"
        (root / "conf.d").mkdir(parents=True)
        upstreams = " ".join(f"server {u.removeprefix('http://')} max_fails=2 fail_timeout=10s;" for u in (url_a, url_b))
        (root / "conf.d" / "default.conf").write_text(
            render_template({"NGINX_PORT": f"127.0.0.1:{port}", "PROMPT_SERVER_UPSTREAMS": upstreams}))
        (root / "nginx.conf").write_text(MAIN.format(root=root))
        check = subprocess.run([NGINX, "-t", "-p", str(root), "-c", str(root / "nginx.conf")], check=False,
                               capture_output=True, text=True)
        assert check.returncode == 0, check.stderr
        proxy = subprocess.Popen([NGINX, "-p", str(root), "-c", str(root / "nginx.conf")],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        proxy_url = f"http://127.0.0.1:{port}"
        replicas = (url_a, url_b)
        try:
            wait_healthy(proxy_url, proxy, root / "error.log", timeout=30)
            first, first_dir = saved_peft(tiny_llama_dir, "p_tuning_mlp", tmp_path / "v1", seed=41)
            second, second_dir = saved_peft(tiny_llama_dir, "prefix", tmp_path / "v2", seed=42)
            expected = [peft_greedy(m, tiny_llama_dir, PROMPT, 10) for m in (first, second)]
            assert expected[0] != expected[1]
            body = {"inputs": PROMPT, "parameters": {"adapter_id": "shared", "max_new_tokens": 10, "details": True}}
            took = {}
            with AdminClient(proxy_url, key=ADMIN_KEY) as admin:
                record, created = admin.push("shared", first_dir)
                assert created and record["version"] == 1
                took["upload"] = _until(lambda: all(_tokens(u, body) == expected[0] for u in replicas), "upload")
                for _ in range(4):  # round robin: both replicas answer through the proxy
                    assert _tokens(proxy_url, body) == expected[0]
                stream = httpx.post(f"{proxy_url}/generate_stream", json=body, timeout=60)
                assert stream.status_code == 200 and stream.text.count("data:") == len(expected[0])

                record, created = admin.push("shared", second_dir)
                assert not created and record["version"] == 2
                took["replace"] = _until(lambda: all(_tokens(u, body) == expected[1] for u in replicas), "replace")
                versions = {httpx.get(f"{u}/adapters/shared", timeout=30).json()["version"] for u in replicas}
                assert versions == {2}

                admin.remove("shared")
                took["delete"] = _until(lambda: all(_tokens(u, body) == 404 for u in replicas), "delete")
                assert all(httpx.get(f"{u}/adapters/shared").status_code == 404 for u in (*replicas, proxy_url))
            # without the admin key the proxy passes the server's refusal on
            refused = httpx.put(f"{proxy_url}/adapters/x", files={"adapter_config.json": b"{}"})
            assert refused.status_code == 401
            print("\nreplicas agree after: " + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in took.items()))
        finally:
            stop(proxy)
