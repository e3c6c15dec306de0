"""The drain before a sleep is fair (issue 8, also-check `wait_until_idle`): a step stops admitting inference
requests, lets the admitted ones reach the server and finish, then sleeps. A request admitted just before the step
began but still on its way to the server is waited for, not put to sleep under (the old drain polled only the
server's counts, saw 0, and the request then met a sleeping server: 503). Real gateway, engine and model server."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from typing import Any

import httpx
import pytest

pytestmark = pytest.mark.slow

HTTP = httpx.Client(timeout=900)
QUESTION = "Hi! Who are you?"
TRANSIT_DELAY_S = 1.5  # a chat's way to the server (a slow network hop), long enough for a step to start inside it


def _chat(gw: Any) -> httpx.Response:
    return HTTP.post(f"{gw.v1}/chat/completions", json={
        "model": gw.base_model, "max_tokens": 2, "messages": [{"role": "user", "content": QUESTION}]})


def test_a_step_waits_for_chats_on_their_way_and_none_fails(
    feedback_gateway: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    gw = feedback_gateway
    lora_id = f"drain/{uuid.uuid4().hex[:10]}"
    assert HTTP.post(f"{gw.v1}/lora/init", json={"lora_id": lora_id, "lora_r": 2, "lora_alpha": 4}).status_code == 200
    forward = gw.transport.handle_async_request

    async def slow_chats(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/chat/completions":
            await asyncio.sleep(TRANSIT_DELAY_S)
        return await forward(request)

    monkeypatch.setattr(gw.transport, "handle_async_request", slow_chats)
    chats: list[httpx.Response] = []
    lock = threading.Lock()

    def steady_traffic(count: int) -> None:
        for _ in range(count):
            reply = _chat(gw)
            with lock:
                chats.append(reply)

    clients = [threading.Thread(target=steady_traffic, args=(3,)) for _ in range(2)]
    for client in clients:
        client.start()
    time.sleep(0.5)  # both first chats are admitted and on their way
    reply = HTTP.post(f"{gw.v1}/feedback", json={
        "lora_id": lora_id, "prompt": QUESTION, "response": "I am SmolLM.", "feedback": "Say Kuro.",
        "training": {"teacher_demonstration": False}})  # a plain step: what matters is the sleep around it
    for client in clients:
        client.join()
    assert reply.status_code == 200, reply.text  # the drain finished: no 504 under the traffic
    assert reply.json()["vllm"]["slept"] is True
    assert [c.status_code for c in chats] == [200] * 6, [c.text for c in chats if c.status_code != 200]
    assert HTTP.get(f"{gw.model_server_url}/is_sleeping").json() == {"is_sleeping": False}
