"""One error shape from build_app for every failure: upstream down/erroring, validation, size, auth, store errors."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic import BaseModel, Field

from claas.api import build_app
from claas.errors import PhaseFailedError, UpstreamUnavailableError
from claas.training.storage import InvalidLoraIdError, LoraExistsError, LoraLockTimeoutError, LoraNotFoundError

CHAT = {"model": "base", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def assert_error_shape(response: Any, status: int) -> dict:  # TestClient or httpx response
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == status
    return body["error"]


def upstream_error(status: int, body: dict) -> Callable[[httpx.Request], httpx.Response]:
    return lambda request: httpx.Response(status, json=body)


def test_upstream_down_is_503_naming_the_url(make_settings, make_engine, unused_port):
    url = f"http://127.0.0.1:{unused_port()}"
    app = build_app(make_settings(vllm_base_url=url), engine=make_engine())
    with TestClient(app) as client:
        for payload in (CHAT, {**CHAT, "stream": True}):
            error = assert_error_shape(client.post("/v1/chat/completions", json=payload), 503)
            assert f"{url}/v1/chat/completions" in error["message"]
            assert error["type"] == "server_error"
        error = assert_error_shape(client.get("/v1/models"), 503)
        assert f"{url}/v1/models" in error["message"]


@pytest.mark.parametrize(
    "body",
    [
        {
            "error": {
                "message": "max_tokens is too large",
                "type": "BadRequestError",
                "param": "max_tokens",
                "code": 400,
            }
        },
        {
            "object": "error",
            "message": "max_tokens is too large",
            "type": "BadRequestError",
            "param": "max_tokens",
            "code": 400,
        },
    ],
    ids=["nested", "flat"],
)
@pytest.mark.parametrize("stream", [False, True])
def test_both_upstream_error_shapes_are_relayed(make_gateway, fake_upstream, body, stream):
    fake_upstream.on("POST", "/v1/chat/completions", upstream_error(400, body))
    with make_gateway(fake_upstream) as (client, _):
        error = assert_error_shape(client.post("/v1/chat/completions", json={**CHAT, "stream": stream}), 400)
    assert error == {  # message and param relayed; the type is OpenAI's, like every other error of the API
        "message": "max_tokens is too large",
        "type": "invalid_request_error",
        "param": "max_tokens",
        "code": 400,
    }


def test_upstream_5xx_names_the_url_and_keeps_the_status(make_gateway, fake_upstream):
    fake_upstream.on("POST", "/v1/chat/completions", lambda r: httpx.Response(500, text="engine dead"))
    with make_gateway(fake_upstream) as (client, _):
        error = assert_error_shape(client.post("/v1/chat/completions", json=CHAT), 500)
    # Names what failed; the server's internal error text stays in the logs.
    assert "engine dead" not in error["message"] and "http://upstream.test/v1/chat/completions" in error["message"]
    assert error["type"] == "server_error"


def test_unknown_model_is_404_with_the_servers_message(make_gateway, fake_upstream):
    missing = {
        "error": {
            "message": "The model `nobody/x` does not exist.",
            "type": "NotFoundError",
            "param": "model",
            "code": 404,
        }
    }
    fake_upstream.on("POST", "/v1/chat/completions", upstream_error(404, missing))
    with make_gateway(fake_upstream) as (client, _):
        error = assert_error_shape(client.post("/v1/chat/completions", json={**CHAT, "model": "nobody/x"}), 404)
    assert error["message"] == "The model `nobody/x` does not exist." and error["param"] == "model"


@pytest.mark.parametrize(
    "path, payload, param",
    [
        ("/v1/chat/completions", {"model": "base"}, "messages"),
        ("/v1/chat/completions", {"model": "base", "messages": []}, "messages"),
        ("/v1/chat/completions", {**CHAT, "n": 0}, "n"),
        ("/v1/completions", {"model": "base"}, "prompt"),
        ("/v1/score", {"model": "base", "messages": [{"role": "user", "content": "q"}]}, "completion"),
    ],
)
def test_validation_on_openai_routes_is_400(make_gateway, fake_upstream, path, payload, param):
    with make_gateway(fake_upstream) as (client, _):
        error = assert_error_shape(client.post(path, json=payload), 400)
    assert error["param"] == param and param in error["message"]
    assert error["type"] == "invalid_request_error"
    assert fake_upstream.requests == []


def test_malformed_json_on_openai_route_is_400(make_gateway, fake_upstream):
    with make_gateway(fake_upstream) as (client, _):
        response = client.post(
            "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
        )
    assert_error_shape(response, 400)


class _Body(BaseModel):
    lora_id: str = Field(min_length=3)


def _claas_routes(app: FastAPI) -> None:
    async def own_route(body: _Body) -> dict:
        return {"ok": body.lora_id}

    async def raising(kind: str) -> dict:
        raise {
            "not_found": LoraNotFoundError("no adapter alice/x"),
            "invalid": InvalidLoraIdError("bad id '../x'"),
            "exists": LoraExistsError("alice/x exists"),
            "locked": LoraLockTimeoutError("lock on alice/x not acquired in 1s"),
            "phase": PhaseFailedError("reload", UpstreamUnavailableError("server at http://x unreachable")),
            "bug": RuntimeError("boom in /secret/path"),
            "phase_bug": PhaseFailedError("distill", OSError("disk full at /secret/path")),
        }[kind]

    app.add_api_route("/v1/test-own", own_route, methods=["POST"])
    app.add_api_route("/v1/test-raise/{kind}", raising, methods=["GET"])


def test_validation_on_claas_routes_is_422_naming_the_field(make_gateway, fake_upstream):
    with make_gateway(fake_upstream) as (client, app):
        _claas_routes(app)
        error = assert_error_shape(client.post("/v1/test-own", json={"lora_id": "x"}), 422)
        missing = assert_error_shape(client.post("/v1/test-own", json={}), 422)
    assert error["param"] == "lora_id" and "lora_id" in error["message"]
    assert missing["param"] == "lora_id"


@pytest.mark.parametrize(
    "kind, status, param, words",
    [
        ("not_found", 404, "lora_id", "no adapter"),
        ("invalid", 422, "lora_id", "bad id"),
        ("exists", 409, "lora_id", "exists"),
        ("locked", 409, "lora_id", "lock"),
        ("phase", 500, None, "phase 'reload' failed"),
        ("bug", 500, None, "internal error while handling GET /v1/test-raise/bug"),
        ("phase_bug", 500, None, "phase 'distill' failed: internal error"),
    ],
)
def test_service_errors_map_to_status_and_shape(make_gateway, fake_upstream, kind, status, param, words):
    with make_gateway(fake_upstream) as (client, app):
        _claas_routes(app)
        error = assert_error_shape(client.get(f"/v1/test-raise/{kind}"), status)
    assert error["param"] == param and words in error["message"]
    assert "/secret/path" not in error["message"] and "boom" not in error["message"]  # internals stay in the log
    assert error["type"] == ("server_error" if status >= 500 else "invalid_request_error")


def test_unknown_route_and_method_use_the_same_shape(make_gateway, fake_upstream):
    with make_gateway(fake_upstream) as (client, _):
        assert_error_shape(client.get("/v1/nothing-here"), 404)
        assert_error_shape(client.get("/v1/chat/completions"), 405)


def test_body_over_the_limit_is_413_by_header_and_by_stream(make_gateway, fake_upstream):
    big = {**CHAT, "messages": [{"role": "user", "content": "x" * 3000}]}
    with make_gateway(fake_upstream, max_request_bytes=2048) as (client, _):
        error = assert_error_shape(client.post("/v1/chat/completions", json=big), 413)
        assert "2048" in error["message"]

        def chunks():  # no Content-Length: sent chunked, counted while read
            yield b'{"model": "base", "messages": [{"role": "user", "content": "'
            for _ in range(10):
                yield b"y" * 500
            yield b'"}]}'

        assert_error_shape(client.post("/v1/chat/completions", content=chunks()), 413)
    assert fake_upstream.requests == []


def test_api_keys_401_403_and_scopes(make_gateway, fake_upstream, make_engine):
    reply = {"id": "chatcmpl-1", "object": "chat.completion", "model": "m", "choices": [], "usage": {}}
    fake_upstream.on("POST", "/v1/chat/completions", lambda r: httpx.Response(200, json=reply))
    base_card = {"data": [{"id": "base", "parent": None}]}
    fake_upstream.on("GET", "/v1/models", lambda r: httpx.Response(200, json=base_card))
    engine = make_engine({"alice/a": "/loras/alice/a", "bob/b": "/loras/bob/b"})
    with make_gateway(fake_upstream, engine=engine, api_keys="admin-key, k2:alice/") as (client, _):
        missing = client.post("/v1/chat/completions", json=CHAT)
        assert_error_shape(missing, 401)
        assert missing.headers["www-authenticate"] == "Bearer"
        assert_error_shape(client.post("/v1/chat/completions", json=CHAT, headers={"Authorization": "Bearer no"}), 401)

        def chat(key: str, model: str) -> httpx.Response:
            headers = {"Authorization": f"Bearer {key}"}
            return client.post("/v1/chat/completions", json={**CHAT, "model": model}, headers=headers)

        assert chat("admin-key", "bob/b").status_code == 200
        assert chat("k2", "alice/a").status_code == 200
        assert chat("k2", "base").status_code == 200  # the base model is open to every key
        error = assert_error_shape(chat("k2", "bob/b"), 403)
        assert "alice/" in error["message"] and error["param"] == "model"
        # metrics stay reachable without a key, like vLLM's
        assert client.get("/metrics").status_code == 200


def test_openai_client_sees_413_and_503_naming_the_url(make_settings, make_engine, unused_port, threaded_server):
    down = f"http://127.0.0.1:{unused_port()}"
    app = build_app(make_settings(vllm_base_url=down, max_request_bytes=2048), engine=make_engine())
    with threaded_server(app) as gateway:
        client = openai.OpenAI(base_url=f"{gateway.base_url}/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.APIStatusError) as too_large:
            client.chat.completions.create(model="base", messages=[{"role": "user", "content": "x" * 4096}])
        assert too_large.value.status_code == 413
        with pytest.raises(openai.InternalServerError) as unavailable:
            client.chat.completions.create(model="base", messages=[{"role": "user", "content": "hi"}])
        assert unavailable.value.status_code == 503
        assert f"{down}/v1/chat/completions" in unavailable.value.message
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model="base", messages=[])
        client.close()
