"""The HTTP soak's short form: every route under concurrent load while adapters are replaced and deleted.

    PROMPT_SERVER_SOAK_SECONDS=1800 .venv/bin/pytest tests/e2e/test_soak_http.py -s     # the 30-minute form
"""

from __future__ import annotations

import os

import httpx

from prompt_server_bench.soak_http import run_http_soak
from tests.api.oracle import upload_parts
from tests.e2e.conftest import LIMITS
from tests.e2e.server import run_server_process
from tests.tiny import make_peft, save_peft

SECONDS = float(os.environ.get("PROMPT_SERVER_SOAK_SECONDS", "15"))
STABLE = ("prompt_tuning", "prefix")  # never written during the soak: their answers are re-checked alone
CHURNED = ("p_tuning_mlp", "p_tuning_lstm", "prefix_projection")  # replaced, deleted and uploaded again


def test_every_route_under_load_while_adapters_change(tiny_llama_dir, tmp_path):
    dirs = {}
    for i, variant in enumerate(STABLE + CHURNED):
        dirs[variant] = save_peft(make_peft(tiny_llama_dir, variant, seed=i, num_virtual_tokens=3 + i),
                                  tmp_path / variant)
    with run_server_process(tiny_llama_dir, tmp_path / "store", tmp_path / "server.log", *LIMITS,
                            "--max-batch-size", "8") as (url, proc):
        for adapter_id, path in dirs.items():
            assert httpx.put(f"{url}/adapters/{adapter_id}", files=upload_parts(path)).status_code == 201
        result = run_http_soak(url, proc.pid, list(STABLE), {a: dirs[a] for a in CHURNED}, SECONDS, clients=8)
        assert httpx.get(f"{url}/health").status_code == 200
    print(result.summary())
    outcomes = {outcome for _, outcome in result.outcomes}
    # a request on a churned adapter may find it deleted (404); nothing else but success is allowed
    assert outcomes <= {"ok", "404"}, result.outcomes
    assert sum(n for (_, o), n in result.outcomes.items() if o == "ok") > 100, result.outcomes
    assert {route for route, _ in result.outcomes} == {"generate", "stream", "completions", "chat", "classify"}
    assert all(status in (200, 201, 204) for (_, status) in result.admin), result.admin
    assert sum(result.admin.values()) > 10, result.admin
    assert result.checked >= 20 and not result.mismatched, result.mismatched[:3]
    assert result.rss_end < result.rss_start * 1.15, result.summary()
