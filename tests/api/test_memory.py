"""What requests leave behind in the server process: no tensor that only Python's cycle collector would free.

Tensors held in a reference cycle wait for the collector's next full pass, which a busy server reaches seldom; the
prefix cache's dropped trees held that way made the ten-minute soak grow 18%. Here every route runs in process,
with adapters uploaded, replaced and deleted and requests refused, while the collector is off; what it then finds
unreachable may hold no tensor (the test client's own streams leave cycles of their own, without tensors).
"""

from __future__ import annotations

import collections

from tests.api.oracle import saved_peft, upload_parts
from tests.cycles import collector_off
from tests.tiny import VARIANTS


def test_requests_uploads_and_refusals_leave_no_tensor_to_the_cycle_collector(serve, tiny_llama_dir, tmp_path):
    dirs = {v: saved_peft(tiny_llama_dir, v, tmp_path / v, seed=i)[1] for i, v in enumerate(VARIANTS)}
    _, head_dir = saved_peft(tiny_llama_dir, "prompt_tuning", tmp_path / "cls", seed=9, task_type="SEQ_CLS")
    statuses: collections.Counter = collections.Counter()
    with serve() as client:

        def call(method: str, path: str, **kw) -> None:
            statuses[(path.split("/")[1], getattr(client, method)(path, **kw).status_code)] += 1

        call("post", "/generate", json={"inputs": "hi", "parameters": {"max_new_tokens": 2}})  # first-use work
        with collector_off() as left:
            for round_ in range(3):  # every adapter replaced twice: a new version each time
                for variant, path in dirs.items():
                    call("put", f"/adapters/{variant}", files=upload_parts(path))
                    params = {"max_new_tokens": 4, "adapter_id": variant}
                    call("post", "/generate", json={"inputs": "Once upon a time", "parameters": params})
                    call("post", "/generate_stream", json={"inputs": "Once upon", "parameters": params})
                    call("post", "/v1/chat/completions", json={"model": variant, "max_tokens": 3,
                                                               "messages": [{"role": "user", "content": "hey"}],
                                                               "stream": round_ == 1})
                    call("post", "/v1/completions", json={"model": variant, "prompt": "a b c", "max_tokens": 3,
                                                          "logprobs": 2})
                call("put", "/adapters/sentiment", files=upload_parts(head_dir), data={"labels": '["neg", "pos"]'})
                call("post", "/classify", json={"inputs": ["I loved it", "meh"], "adapter_id": "sentiment"})
                call("post", "/generate", json={"inputs": "x", "parameters": {"adapter_id": "nope"}})
                call("post", "/generate", json={"inputs": "x " * 400, "parameters": {"max_new_tokens": 4}})
                call("post", "/generate", json={"inputs": "x", "parameters": {"max_new_tokens": -1}})
                call("put", "/adapters/bad", files={"adapter_config.json": ("adapter_config.json", b"{not json")})
                call("delete", f"/adapters/{VARIANTS[0]}")
    # what ran: every route answered, and the refusals were refusals
    assert statuses[("adapters", 201)] + statuses[("adapters", 200)] == 3 * (len(VARIANTS) + 1), statuses
    assert statuses[("generate", 200)] == 1 + 3 * len(VARIANTS)
    assert statuses[("generate_stream", 200)] == 3 * len(VARIANTS)
    assert statuses[("v1", 200)] == 2 * 3 * len(VARIANTS) and statuses[("classify", 200)] == 3
    assert statuses[("generate", 404)] == 3 and statuses[("generate", 422)] + statuses[("generate", 400)] == 6
    assert statuses[("adapters", 400)] == 3 and statuses[("adapters", 204)] == 3
    assert left == [], left[:10]
