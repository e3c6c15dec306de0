"""Scoped API keys (issue 8, finding 2): a key `k:alice` may use the base models and ids under `alice/` (whole path
segments), nothing else, whether the store knows the id or not."""

from __future__ import annotations

import httpx
import pytest

from claas.auth import AuthScope

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
REPLY = {"id": "chatcmpl-1", "object": "chat.completion", "model": "m", "choices": [], "usage": {}}
CARDS = [{"id": "base", "parent": None}, {"id": "alice/a", "parent": "base"}, {"id": "ghost/x", "parent": "base"},
         {"id": "alice2/x", "parent": "base"}]


@pytest.mark.parametrize("prefix", ["alice", "alice/"])
def test_a_prefix_matches_whole_segments(prefix: str) -> None:
    scope = AuthScope(prefix=prefix, authenticated=True)
    assert scope.allows("alice/a") and scope.allows("alice/a/b@latest") and scope.allows("alice")
    assert not scope.allows("alice2/x") and not scope.allows("alicex") and not scope.allows("bob/alice")


def test_scoped_key_reaches_only_its_adapters_and_base_models(make_gateway, fake_upstream, make_engine) -> None:
    fake_upstream.on("POST", "/v1/chat/completions", lambda r: httpx.Response(200, json=REPLY))
    fake_upstream.on("GET", "/v1/models", lambda r: httpx.Response(200, json={"data": CARDS}))
    engine = make_engine({"alice/a": "/loras/alice/a"})  # ghost/x and alice2/x are loaded upstream, unknown here
    with make_gateway(fake_upstream, engine=engine, api_keys="adm,ka:alice") as (client, _):

        def chat(key: str, model: str) -> int:
            headers = {"Authorization": f"Bearer {key}"}
            return client.post("/v1/chat/completions", json={**CHAT, "model": model}, headers=headers).status_code

        assert chat("ka", "alice/a") == 200 and chat("ka", "base") == 200
        assert chat("ka", "ghost/x") == 403  # loaded on the server, unknown to the store: still not alice's
        assert chat("ka", "alice2/x") == 403  # 'alice' is not a prefix of the segment 'alice2'
        assert chat("adm", "ghost/x") == 200
        score = {"model": "ghost/x", "messages": CHAT["messages"], "completion": "x"}
        reply = client.post("/v1/score", json=score, headers={"Authorization": "Bearer ka"})
        assert reply.status_code == 403 and reply.json()["error"]["param"] == "model"
        models = client.get("/v1/models", headers={"Authorization": "Bearer ka"}).json()["data"]
        assert [card["id"] for card in models] == ["base", "alice/a"]
        lora = client.get("/v1/lora/export", params={"lora_id": "alice2/x"}, headers={"Authorization": "Bearer ka"})
        assert lora.status_code == 403
    chats = [r for r in fake_upstream.requests if r.url.path == "/v1/chat/completions"]
    assert len(chats) == 3  # the refused ones never reached the server


@pytest.mark.parametrize(
    "orchestration",
    [{"wake_after": False}, {"sleep_level": 2}, {"wake_on_failure": False}, {"sleep_before": False}],
)
def test_orchestration_that_affects_every_tenant_is_admin_only(make_gateway, fake_upstream, make_engine,
                                                                orchestration) -> None:
    body = {"lora_id": "alice/a", "prompt": "hi", "response": "hello", "feedback": "shorter",
            "orchestration": orchestration}
    with make_gateway(fake_upstream, engine=make_engine(), api_keys="adm,ka:alice") as (client, _):
        scoped = client.post("/v1/feedback", json=body, headers={"Authorization": "Bearer ka"})
        defaults = client.post("/v1/feedback", json={**body, "orchestration": {"sleep_level": 1}},
                               headers={"Authorization": "Bearer ka"})
        admin = client.post("/v1/feedback", json=body, headers={"Authorization": "Bearer adm"})
    (name,) = orchestration
    assert scoped.status_code == 403 and scoped.json()["error"]["param"] == f"orchestration.{name}"
    assert defaults.status_code == 404 and admin.status_code == 404  # past the check: the adapter does not exist
