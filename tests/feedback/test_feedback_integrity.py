"""Feedback trains on what the caller means, or on nothing (issue 8): real model server, real local engine, real
gateway on 127.0.0.1. Refusals come before any sleep, step or write."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from claas.core.types import LoraInitRequest
from claas.deps import get_inference
from claas.errors import UpstreamError

pytestmark = pytest.mark.slow

QUESTION = "Hi! Who are you?"
FEEDBACK = "Your name is Kuro. Always introduce yourself as Kuro."
HTTP = httpx.Client(timeout=900)


def new_lora(gw: Any) -> str:
    lora_id = f"fi/{uuid.uuid4().hex[:10]}"
    reply = HTTP.post(f"{gw.v1}/lora/init", json={"lora_id": lora_id, "lora_r": 4, "lora_alpha": 8})
    assert reply.status_code == 200, reply.text
    return lora_id


def served(gw: Any, lora_id: str) -> Any:
    client = openai.OpenAI(base_url=gw.v1, api_key="unused")
    return client.chat.completions.create(
        model=lora_id, messages=[{"role": "user", "content": QUESTION}], temperature=0, max_tokens=8
    )


def feedback(gw: Any, lora_id: str, response: str, **extra: Any) -> httpx.Response:
    body = {"lora_id": lora_id, "prompt": QUESTION, "response": response, "feedback": FEEDBACK, **extra}
    return HTTP.post(f"{gw.v1}/feedback", json=body)


def no_sleep_or_step(gw: Any, since_calls: int, since_batches: int) -> bool:
    return "/sleep" not in gw.transport.paths(since=since_calls) and len(gw.engine.batches) == since_batches


def test_completion_id_with_another_text_is_refused_before_the_step(feedback_gateway: Any) -> None:
    gw = feedback_gateway
    lora_id = new_lora(gw)
    completion = served(gw, lora_id)
    calls, batches = len(gw.transport.calls), len(gw.engine.batches)
    reply = feedback(gw, lora_id, "Something I never said.", completion_id=completion.id)
    assert reply.status_code == 422, reply.text
    assert reply.json()["error"]["param"] == "response"
    assert no_sleep_or_step(gw, calls, batches)


def test_the_log_records_what_was_trained_on(feedback_gateway: Any) -> None:
    gw = feedback_gateway
    lora_id = new_lora(gw)
    completion = served(gw, lora_id)
    reply = feedback(gw, lora_id, completion.choices[0].message.content, completion_id=completion.id)
    assert reply.status_code == 200, reply.text
    (item,) = json.loads(Path(reply.json()["feedback_log_path"]).read_text())["items"]
    assert item["source"] == "cache" and item["completion_id"] == completion.id
    assert item["response_tokens"] == completion.usage.completion_tokens
    assert item["prompt_tokens"] == completion.usage.prompt_tokens


def test_delete_unloads_every_served_version(feedback_gateway: Any) -> None:
    gw = feedback_gateway
    lora_id = new_lora(gw)
    distilled = HTTP.post(f"{gw.v1}/distill", json={"lora_id": lora_id, "prompt": QUESTION, "response": "I am Smol.",
                                                     "feedback": FEEDBACK})
    assert distilled.status_code == 200, distilled.text
    version = distilled.json()["distill_result"]["lora_id"]
    for name in (lora_id, f"{lora_id}@latest", version):
        served(gw, name)  # the proxy loads versions on first use
    loaded = {card["id"] for card in HTTP.get(f"{gw.model_server_url}/v1/models").json()["data"]}
    assert {lora_id, f"{lora_id}@latest", version} <= loaded
    reply = HTTP.delete(f"{gw.v1}/lora", params={"lora_id": lora_id})
    assert reply.status_code == 200, reply.text
    loaded = {card["id"] for card in HTTP.get(f"{gw.model_server_url}/v1/models").json()["data"]}
    assert not {name for name in loaded if name.partition("@")[0] == lora_id}
    gone = HTTP.post(f"{gw.v1}/chat/completions", json={"model": f"{lora_id}@latest", "max_tokens": 2,
                                                         "messages": [{"role": "user", "content": "hi"}]})
    assert gone.status_code == 404


@pytest.mark.parametrize(
    "fields, param",
    [({"target_modules": ["q_proj", "no_such_proj"]}, "target_modules"), ({"base_model": "other-model"}, "base_model")],
)
def test_init_refuses_what_the_base_model_cannot_take(feedback_gateway: Any, fields: dict, param: str) -> None:
    gw = feedback_gateway
    lora_id = f"fi/{uuid.uuid4().hex[:10]}"
    reply = HTTP.post(f"{gw.v1}/lora/init", json={"lora_id": lora_id, **fields})
    assert reply.status_code == 422, reply.text
    error = reply.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert not gw.engine.store.exists(lora_id)  # refused before any write
    again = HTTP.post(f"{gw.v1}/lora/init", json={"lora_id": lora_id})
    assert again.status_code == 200, again.text  # and the id is still free


def _client(gw: Any) -> Any:
    """The gateway's own inference client (the fixture's dependency override)."""
    return asyncio.run(gw.app.dependency_overrides[get_inference]())


def test_init_with_a_base_model_name_is_refused_before_any_write(feedback_gateway: Any) -> None:
    gw = feedback_gateway
    reply = HTTP.post(f"{gw.v1}/lora/init", json={"lora_id": gw.base_model})
    assert reply.status_code == 422, reply.text
    assert reply.json()["error"]["param"] == "lora_id"
    assert not gw.engine.store.exists(gw.base_model)


def test_init_that_the_server_refuses_is_undone(feedback_gateway: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    gw = feedback_gateway
    lora_id = f"fi/{uuid.uuid4().hex[:10]}"

    async def refuse(name: str, path: str) -> None:
        raise UpstreamError(400, f"cannot load {name}")

    monkeypatch.setattr(_client(gw), "reload_lora_adapter", refuse)  # how init serves a new adapter
    reply = HTTP.post(f"{gw.v1}/lora/init", json={"lora_id": lora_id})
    assert reply.status_code == 400 and "cannot load" in reply.json()["error"]["message"]
    assert not gw.engine.store.exists(lora_id)
    monkeypatch.undo()
    retry = HTTP.post(f"{gw.v1}/lora/init", json={"lora_id": lora_id})
    assert retry.status_code == 200, retry.text  # not "already exists"


def test_feedback_on_an_unservable_adapter_is_refused_before_the_step(feedback_gateway: Any) -> None:
    gw = feedback_gateway
    name = gw.base_model  # e.g. made by an older CLaaS straight in the store
    gw.engine.trainer.init_lora(LoraInitRequest(lora_id=name, lora_r=2, lora_alpha=4))
    try:
        calls, batches = len(gw.transport.calls), len(gw.engine.batches)
        reply = feedback(gw, name, "I am SmolLM.")
        assert reply.status_code == 422, reply.text
        assert reply.json()["error"]["param"] == "lora_id"
        assert no_sleep_or_step(gw, calls, batches)
        assert gw.engine.store.read_metadata(name).step == 0
    finally:
        gw.engine.store.delete(name)
        gw.engine.trainer.evict(name)


def test_oversized_feedback_is_413_naming_the_limit_before_any_sleep(
    feedback_gateway: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    gw = feedback_gateway
    lora_id = new_lora(gw)
    calls, batches = len(gw.transport.calls), len(gw.engine.batches)
    monkeypatch.setattr(gw.settings, "max_training_tokens", 64)
    reply = feedback(gw, lora_id, "I am SmolLM. " * 40)
    assert reply.status_code == 413, reply.text
    error = reply.json()["error"]
    assert error["param"] == "response" and "CLAAS_MAX_TRAINING_TOKENS" in error["message"]
    assert "at most 64" in error["message"]
    monkeypatch.setattr(gw.settings, "max_training_tokens", 10**6)  # now the model's context is the bound
    context = HTTP.get(f"{gw.model_server_url}/v1/models").json()["data"][0]["max_model_len"]
    reply = feedback(gw, lora_id, "Hello. " * context)
    assert reply.status_code == 413, reply.text
    message = reply.json()["error"]["message"]
    assert "context length" in message and f"at most {context}" in message
    assert no_sleep_or_step(gw, calls, batches)
    monkeypatch.undo()
    assert feedback(gw, lora_id, "I am SmolLM.").status_code == 200  # a normal one still trains


def test_idempotency_key_replays_the_first_outcome(feedback_gateway: Any) -> None:
    gw = feedback_gateway
    lora_id = new_lora(gw)
    key = {"Idempotency-Key": uuid.uuid4().hex}
    first = HTTP.post(f"{gw.v1}/feedback", headers=key, json={"lora_id": lora_id, "prompt": QUESTION,
                                                               "response": "I am SmolLM.", "feedback": FEEDBACK})
    again = HTTP.post(f"{gw.v1}/feedback", headers=key, json={"lora_id": lora_id, "prompt": QUESTION,
                                                               "response": "I am SmolLM.", "feedback": FEEDBACK})
    assert first.status_code == again.status_code == 200, again.text
    assert again.json()["request_id"] == first.json()["request_id"] and again.headers["idempotent-replayed"] == "true"
    assert gw.engine.store.read_metadata(lora_id).step == 1
    other = HTTP.post(f"{gw.v1}/feedback", headers=key, json={"lora_id": lora_id, "prompt": QUESTION,
                                                               "response": "Something else.", "feedback": FEEDBACK})
    assert other.status_code == 422 and other.json()["error"]["param"] == "Idempotency-Key"


def test_a_transient_reload_failure_is_retried(feedback_gateway: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    gw = feedback_gateway
    lora_id = new_lora(gw)
    client = _client(gw)
    real_reload = client.reload_lora_adapter
    failures = [UpstreamError(500, "busy")]

    async def flaky(name: str, path: str) -> None:
        if failures:
            raise failures.pop()
        await real_reload(name, path)

    monkeypatch.setattr(client, "reload_lora_adapter", flaky)
    reply = feedback(gw, lora_id, "I am SmolLM.")
    assert reply.status_code == 200, reply.text
    assert not failures and gw.engine.store.read_metadata(lora_id).step == 1


def test_saved_but_not_served_says_so_and_a_keyed_retry_only_reloads(
    feedback_gateway: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    gw = feedback_gateway
    lora_id = new_lora(gw)
    client = _client(gw)

    async def refuse(name: str, path: str) -> None:
        raise UpstreamError(500, "the server cannot load adapters right now")

    monkeypatch.setattr(client, "reload_lora_adapter", refuse)
    key = {"Idempotency-Key": uuid.uuid4().hex}
    body = {"lora_id": lora_id, "prompt": QUESTION, "response": "I am SmolLM.", "feedback": FEEDBACK}
    stale = HTTP.post(f"{gw.v1}/feedback", headers=key, json=body)
    assert stale.status_code == 503 and "retry-after" in stale.headers, stale.text
    assert "is saved (step 1)" in stale.json()["error"]["message"]
    assert gw.engine.store.read_metadata(lora_id).step == 1
    again = HTTP.post(f"{gw.v1}/feedback", headers=key, json=body)  # still refused: the same answer, no new step
    assert again.status_code == 503 and gw.engine.store.read_metadata(lora_id).step == 1
    monkeypatch.undo()
    fixed = HTTP.post(f"{gw.v1}/feedback", headers=key, json=body)
    assert fixed.status_code == 200, fixed.text
    assert fixed.json()["reloaded"] is True and fixed.json()["distill_result"]["step"] == 1
    assert gw.engine.store.read_metadata(lora_id).step == 1  # the old code trained a second step on each retry
    loaded = {card["id"] for card in HTTP.get(f"{gw.model_server_url}/v1/models").json()["data"]}
    assert lora_id in loaded


def test_distill_reloads_a_served_latest_alias(feedback_gateway: Any) -> None:
    gw = feedback_gateway
    lora_id = new_lora(gw)
    body = {"lora_id": lora_id, "prompt": QUESTION, "response": "I am SmolLM.", "feedback": FEEDBACK,
            "training": {"learning_rate": 1e-2}}

    def score(model: str) -> float:
        reply = HTTP.post(f"{gw.v1}/score", json={"model": model, "completion": "I am Kuro.",
                                                   "messages": [{"role": "user", "content": QUESTION}]})
        assert reply.status_code == 200, reply.text
        return reply.json()["sum_logprob"]

    first = HTTP.post(f"{gw.v1}/distill", json=body).json()["distill_result"]["lora_id"]
    assert score(f"{lora_id}@latest") == pytest.approx(score(first), abs=1e-5)  # the alias is loaded now
    second = HTTP.post(f"{gw.v1}/distill", json={**body, "response": "My name is SmolLM."}).json()
    second_id = second["distill_result"]["lora_id"]
    assert second_id != first
    assert score(f"{lora_id}@latest") == pytest.approx(score(second_id), abs=1e-5)  # the old code kept `first`
    assert score(second_id) != pytest.approx(score(first), abs=1e-4)
