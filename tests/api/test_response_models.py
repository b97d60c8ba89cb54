"""Routes answer with pydantic response models, so /openapi.json describes exactly what is sent."""

from __future__ import annotations

import pytest

from prompt_server.api.schemas.classify import ClassifyResponse
from prompt_server.api.schemas.openai import ChatCompletionResponse, CompletionResponse, ModelList
from prompt_server.api.schemas.service import Health, Info
from prompt_server.api.schemas.tgi import GenerateResponse

PROMPT = "Once upon a time"
CASES = {
    ("get", "/health"): (None, Health),
    ("get", "/info"): (None, Info),
    ("get", "/v1/models"): (None, ModelList),
    ("post", "/generate"): ({"inputs": PROMPT, "parameters": {"max_new_tokens": 3, "details": True,
                                                              "decoder_input_details": True}}, GenerateResponse),
    ("post", "/v1/completions"): ({"prompt": PROMPT, "max_tokens": 3, "logprobs": 1}, CompletionResponse),
    ("post", "/v1/chat/completions"): ({"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 3,
                                        "logprobs": True}, ChatCompletionResponse),
    ("post", "/classify"): ({"inputs": [PROMPT], "labels": ["yes", "no"]}, ClassifyResponse),
}


@pytest.mark.parametrize(("method", "path"), list(CASES))
def test_every_answer_is_its_documented_model(client, method, path):
    body, model = CASES[(method, path)]
    r = client.get(path) if method == "get" else client.post(path, json=body)
    assert r.status_code == 200, r.text
    parsed = model.model_validate(r.json())  # no field the model does not know, none missing
    assert parsed.model_dump(mode="json") == r.json()
    schema = client.get("/openapi.json").json()
    ok = schema["paths"][path][method]["responses"]["200"]["content"]["application/json"]["schema"]
    assert ok == {"$ref": f"#/components/schemas/{model.__name__}"}
