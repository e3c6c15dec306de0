"""Bad input is a 4xx naming the field, never a 500 (issue 8, findings 9 and 15): one error vocabulary (OpenAI's
types), and `param` names a field or nothing."""

from __future__ import annotations

import json
from typing import Any

import pytest

FEEDBACK = {"lora_id": "alice/a", "prompt": "hi", "response": "hello", "feedback": "shorter"}


def _error(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == status
    return error


@pytest.mark.parametrize(
    "change, param",
    [
        ({"response": ""}, "response"),
        ({"feedback": ""}, "feedback"),
        ({"lora_id": "a" * 200}, "lora_id"),
        ({"prompt": [{"role": "user", "content": 42}]}, "prompt"),
        ({"prompt": [{"content": "no role"}]}, "prompt"),
        ({"rollout_logprobs": [float("nan")]}, "rollout_logprobs.0"),
        ({"rollout_logprobs": [float("-inf")]}, "rollout_logprobs.0"),
    ],
)
def test_single_form_feedback_refuses_like_the_batch_form(make_gateway, fake_upstream, change, param) -> None:
    headers = {"content-type": "application/json"}
    with make_gateway(fake_upstream) as (client, _):  # json.dumps writes NaN / -Infinity as Python's json reads them
        single = client.post("/v1/feedback", content=json.dumps({**FEEDBACK, **change}), headers=headers)
        batch = client.post("/v1/feedback", content=json.dumps({"requests": [{**FEEDBACK, **change}]}), headers=headers)
    error = _error(single, 422)
    assert error["param"] == param and param.partition(".")[0] in error["message"]
    assert _error(batch, 422)["param"].endswith(param)
    assert fake_upstream.requests == []


def test_message_content_must_be_text_or_parts_on_openai_routes(make_gateway, fake_upstream) -> None:
    with make_gateway(fake_upstream) as (client, _):
        chat = client.post("/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": 7}]})
        score = client.post("/v1/score", json={"model": "m", "completion": "x",
                                               "messages": [{"role": "user", "content": {"a": 1}}]})
    assert _error(chat, 400)["param"] == "messages"
    assert _error(score, 400)["param"] == "messages"
    assert fake_upstream.requests == []


@pytest.mark.parametrize("path", ["/v1/feedback", "/v1/chat/completions"])
def test_malformed_json_names_no_character_offset(make_gateway, fake_upstream, path) -> None:
    with make_gateway(fake_upstream) as (client, _):
        reply = client.post(path, content=b'{"lora_id": "x", oops}', headers={"content-type": "application/json"})
    error = _error(reply, 422 if path == "/v1/feedback" else 400)
    assert error["param"] is None and "not valid JSON" in error["message"]


def test_every_error_type_is_openais(make_gateway, fake_upstream, make_engine) -> None:
    with make_gateway(fake_upstream, engine=make_engine(), api_keys="adm,ka:alice") as (client, _):
        unauthenticated = client.post("/v1/feedback", json=FEEDBACK)
        forbidden = client.post("/v1/feedback", json={**FEEDBACK, "lora_id": "bob/b"},
                                headers={"Authorization": "Bearer ka"})
        missing = client.post("/v1/feedback", json=FEEDBACK, headers={"Authorization": "Bearer ka"})
        no_route = client.get("/v1/nothing", headers={"Authorization": "Bearer ka"})
    assert unauthenticated.json()["error"]["type"] == "authentication_error"
    assert forbidden.json()["error"]["type"] == "permission_error"
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "invalid_request_error"
    assert no_route.json()["error"]["type"] == "invalid_request_error"


def test_a_batch_has_one_training_config(make_gateway, fake_upstream, make_engine) -> None:
    items = [{**FEEDBACK, "training": {"learning_rate": 1e-4}}, {**FEEDBACK, "training": {"learning_rate": 1e-2}}]
    with make_gateway(fake_upstream, engine=make_engine({"alice/a": "/p"})) as (client, _):
        reply = client.post("/v1/feedback", json={"requests": items})
    assert _error(reply, 422)["param"] == "requests.1.training"
    assert fake_upstream.requests == []
