"""The tenancy matrix (issue 8 proof): every route of the gateway x {no key, wrong key, another tenant's key, the
owner's key, an admin key} -> the expected status, on the real stack (real engine on the session trainer, real
model server, the gateway on a free 127.0.0.1 port). The resource is alice's adapter; bob's key is "another
tenant". Writes (init, delete) use a fresh id per cell, so one cell's outcome cannot change another's."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from claas.api import build_app
from claas.training.engine.local import LocalEngine
from tests.gateway.conftest import real_stack_settings

pytestmark = pytest.mark.slow

KEYS = {"none": None, "wrong": "not-a-key", "other": "kb", "own": "ka", "admin": "adm"}
AUTH_ONLY = {"none": 401, "wrong": 401, "other": 403, "own": 200, "admin": 200}  # a route acting on alice's ids
ANY_KEY = {"none": 401, "wrong": 401, "other": 200, "own": 200, "admin": 200}  # any valid key; results scoped
ADMIN_ONLY = {"none": 401, "wrong": 401, "other": 403, "own": 403, "admin": 200}
OPEN = dict.fromkeys(KEYS, 200)
CHEAP = {"learning_rate": 1e-3, "teacher_demonstration": False}


@dataclass
class Stack:
    client: httpx.Client
    base_model: str
    adapter: str  # alice's adapter, created by the admin

    def new_adapter(self) -> str:
        lora_id = f"alice/m{uuid.uuid4().hex[:8]}"
        reply = self.client.post("/v1/lora/init", json={"lora_id": lora_id, "lora_r": 2, "lora_alpha": 4},
                                 headers=_headers("admin"))
        assert reply.status_code == 200, reply.text
        return lora_id


def _headers(who: str) -> dict[str, str]:
    key = KEYS[who]
    return {"Authorization": f"Bearer {key}"} if key is not None else {}


@pytest.fixture(scope="module")
def stack(model_server: Any, trainer: Any, threaded_uvicorn: Any, tmp_path_factory: Any) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("tenancy")
    settings = real_stack_settings(model_server, trainer, root, feedback_lock_timeout_s=300.0,
                                   api_keys="adm,ka:alice,kb:bob")
    app = build_app(settings, engine=LocalEngine(settings, trainer=trainer))
    with threaded_uvicorn(app) as server, httpx.Client(base_url=server.base_url, timeout=600) as client:
        probe = Stack(client, model_server.model, "")
        probe.adapter = probe.new_adapter()
        yield probe


Call = Callable[[Stack, str], httpx.Response]


def _post(path: str, body: Callable[[Stack], dict[str, Any]]) -> Call:
    return lambda s, who: s.client.post(path, json=body(s), headers=_headers(who))


def _get(path: str, params: Callable[[Stack], dict[str, Any]] = lambda s: {}) -> Call:
    return lambda s, who: s.client.get(path, params=params(s), headers=_headers(who))


def _init(s: Stack, who: str) -> httpx.Response:
    lora_id = f"alice/i{uuid.uuid4().hex[:8]}"
    return s.client.post("/v1/lora/init", json={"lora_id": lora_id, "lora_r": 2, "lora_alpha": 4},
                         headers=_headers(who))


def _delete(s: Stack, who: str) -> httpx.Response:
    lora_id = s.new_adapter()
    reply = s.client.delete("/v1/lora", params={"lora_id": lora_id}, headers=_headers(who))
    exists = s.client.get("/v1/lora", params={"prefix": lora_id}, headers=_headers("admin")).json()["loras"]
    assert bool(exists) == (reply.status_code != 200)  # refused: still there; deleted: gone
    return reply


def _messages(s: Stack) -> list[dict[str, str]]:
    return [{"role": "user", "content": "Hi"}]


ROUTES: dict[str, tuple[Call, dict[str, int]]] = {
    "POST /v1/chat/completions": (_post("/v1/chat/completions", lambda s: {
        "model": s.adapter, "messages": _messages(s), "max_tokens": 1}), AUTH_ONLY),
    "POST /v1/completions": (_post("/v1/completions", lambda s: {
        "model": s.adapter, "prompt": "Hi", "max_tokens": 1}), AUTH_ONLY),
    "POST /v1/score": (_post("/v1/score", lambda s: {
        "model": s.adapter, "messages": _messages(s), "completion": "Hello"}), AUTH_ONLY),
    "GET /v1/models": (_get("/v1/models"), ANY_KEY),
    "POST /v1/feedback": (_post("/v1/feedback", lambda s: {
        "lora_id": s.adapter, "prompt": "Hi", "response": "Hello.", "feedback": "Say Kuro.", "training": CHEAP}),
        AUTH_ONLY),
    "POST /v1/distill": (_post("/v1/distill", lambda s: {
        "lora_id": s.adapter, "prompt": "Hi", "response": "Hello.", "feedback": "Say Kuro.", "training": CHEAP}),
        AUTH_ONLY),
    "POST /v1/lora/init": (_init, AUTH_ONLY),
    "GET /v1/lora": (_get("/v1/lora", lambda s: {"prefix": "alice/"}), ANY_KEY),
    "GET /v1/lora/export": (_get("/v1/lora/export", lambda s: {"lora_id": s.adapter}), AUTH_ONLY),
    "DELETE /v1/lora": (_delete, AUTH_ONLY),
    "GET /v1/health": (_get("/v1/health"), OPEN),
    "GET /v1/dashboard": (_get("/v1/dashboard", lambda s: {"lora_id": s.adapter}), AUTH_ONLY),
    "GET /v1/eval": (_get("/v1/eval"), ADMIN_ONLY),
    # Past the check an admin reaches the lookup: no such run (404), the same as with any other missing run.
    "GET /v1/eval/{run_id}": (_get("/v1/eval/no-such-run"), {**ADMIN_ONLY, "admin": 404}),
    "GET /v1/eval/{run_id}/plots/{name}": (_get("/v1/eval/no-such-run/plots/x.png"), {**ADMIN_ONLY, "admin": 404}),
    "GET /openapi.json": (_get("/openapi.json"), ANY_KEY),
    "GET /docs": (_get("/docs"), ANY_KEY),
    "GET /metrics": (_get("/metrics"), OPEN),  # like vLLM's: counts only, no tenant data
}


def test_the_matrix_covers_every_route(stack: Stack) -> None:
    schema = stack.client.get("/openapi.json", headers=_headers("admin")).json()
    operations = {f"{method.upper()} {path}" for path, ops in schema["paths"].items() for method in ops}
    assert operations <= set(ROUTES), operations - set(ROUTES)


@pytest.mark.parametrize("who", list(KEYS))
@pytest.mark.parametrize("route", list(ROUTES))
def test_route_by_key(stack: Stack, route: str, who: str) -> None:
    call, expected = ROUTES[route]
    reply = call(stack, who)
    assert reply.status_code == expected[who], f"{route} as {who}: {reply.status_code} {reply.text[:300]}"
    if reply.status_code in (401, 403) and reply.headers.get("content-type", "").startswith("application/json"):
        error = reply.json()["error"]
        assert error["type"] == ("authentication_error" if reply.status_code == 401 else "permission_error")


def test_what_another_tenant_sees_is_its_own(stack: Stack) -> None:
    """Where bob's key gets 200 on a listing, alice's adapter is not in it (and the health details are admin's)."""
    def ids(who: str) -> tuple[set[str], set[str]]:
        models = stack.client.get("/v1/models", headers=_headers(who)).json()["data"]
        loras = stack.client.get("/v1/lora", params={"prefix": "alice/"}, headers=_headers(who)).json()["loras"]
        return {card["id"] for card in models}, {lora["lora_id"] for lora in loras}

    models, loras = ids("other")
    assert stack.adapter not in models and not loras and stack.base_model in models
    models, loras = ids("own")
    assert stack.adapter in models and stack.adapter in loras
    assert set(stack.client.get("/v1/health", headers=_headers("other")).json()) == {"status"}
    assert "inference" in stack.client.get("/v1/health", headers=_headers("admin")).json()
