"""Two servers sharing one adapter store behind nginx: an upload through the proxy serves on both replicas."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from prompt_server.client import AdminClient
from tests.api.oracle import peft_greedy, saved_peft
from tests.e2e.conftest import LIMITS
from tests.e2e.server import free_port, run_server, stop, wait_healthy

NGINX = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if Path(p).is_file()),
                                      None)
PROMPT = "Once upon a time"

CONFIG = """
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
    client_max_body_size 64m;
    upstream replicas {{
        server 127.0.0.1:{a};
        server 127.0.0.1:{b};
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://replicas;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_read_timeout 300s;
        }}
    }}
}}
"""


@pytest.mark.skipif(NGINX is None, reason="the nginx binary is not installed (`make test` installs it)")
def test_upload_through_proxy_serves_on_both_replicas(tiny_llama_dir, tmp_path):
    store = tmp_path / "store"
    with run_server(tiny_llama_dir, store, tmp_path / "a.log", *LIMITS) as url_a, \
            run_server(tiny_llama_dir, store, tmp_path / "b.log", *LIMITS) as url_b:
        port = free_port()
        root = tmp_path / "nginx"
        root.mkdir()
        conf = root / "nginx.conf"
        conf.write_text(CONFIG.format(root=root, a=url_a.rsplit(":", 1)[1], b=url_b.rsplit(":", 1)[1], port=port))
        proxy = subprocess.Popen([NGINX, "-p", str(root), "-c", str(conf)], stdout=subprocess.DEVNULL,
                                 stderr=subprocess.STDOUT)
        proxy_url = f"http://127.0.0.1:{port}"
        try:
            wait_healthy(proxy_url, proxy, root / "error.log", timeout=30)
            peft, adapter_dir = saved_peft(tiny_llama_dir, "p_tuning_mlp", tmp_path / "shared", seed=41)
            expected = peft_greedy(peft, tiny_llama_dir, PROMPT, 10)
            with AdminClient(proxy_url) as admin:
                record, created = admin.push("shared", adapter_dir)
            assert created and record["version"] == 1
            body = {"inputs": PROMPT, "parameters": {"adapter_id": "shared", "max_new_tokens": 10, "details": True}}
            for url in (url_a, url_b, proxy_url, proxy_url):
                r = httpx.post(f"{url}/generate", json=body, timeout=60)
                assert r.status_code == 200, (url, r.text)
                assert [t["id"] for t in r.json()["details"]["tokens"]] == expected, url
            stream = httpx.post(f"{proxy_url}/generate_stream", json=body, timeout=60)
            assert stream.text.count("data:") == len(expected)

            with AdminClient(proxy_url) as admin:
                admin.remove("shared")
            for url in (url_a, url_b):
                deadline = time.monotonic() + 5
                while httpx.get(f"{url}/adapters/shared").status_code != 404 and time.monotonic() < deadline:
                    time.sleep(0.05)
                assert httpx.post(f"{url}/generate", json=body).status_code == 404, url
        finally:
            stop(proxy)
