"""Sleep and wake (issue 8, findings 3, 4, 13): one reference-counted coordinator per inference server; a sleep that
times out still ends awake; only admins may leave the server asleep; chats wait for a step instead of failing; on
CPU the server does not sleep at all; a server found asleep at start is woken. Real model server throughout."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from typing import Any

import httpx
import pytest

from claas.api import build_app
from claas.core.config import Settings
from claas.errors import UpstreamTimeoutError
from claas.inference.sleep import SleepCoordinator
from claas.inference.vllm import VllmClient
from claas.training.engine.local import LocalEngine

pytestmark = pytest.mark.slow

HTTP = httpx.Client(timeout=900)
QUESTION = "Hi! Who are you?"


def is_sleeping(url: str) -> bool:
    return HTTP.get(f"{url}/is_sleeping").json()["is_sleeping"]


def new_lora(gw: Any) -> str:
    lora_id = f"sl/{uuid.uuid4().hex[:10]}"
    assert HTTP.post(f"{gw.v1}/lora/init", json={"lora_id": lora_id, "lora_r": 2, "lora_alpha": 4}).status_code == 200
    return lora_id


def feedback(gw: Any, lora_id: str, **extra: Any) -> httpx.Response:
    body = {"lora_id": lora_id, "prompt": QUESTION, "response": "I am SmolLM.", "feedback": "Say Kuro.", **extra}
    return HTTP.post(f"{gw.v1}/feedback", json=body)


class TimesOutAfterSleeping(httpx.AsyncBaseTransport):
    """The real server gets the /sleep call and goes to sleep, but the answer never reaches the client in time."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        if request.url.path == "/sleep":
            await response.aread()
            raise httpx.ReadTimeout("timed out waiting for /sleep", request=request)
        return response


def test_a_sleep_that_times_out_still_ends_awake(model_server: Any) -> None:
    async def run() -> None:
        client = VllmClient(model_server.base_url, transport=TimesOutAfterSleeping())
        coordinator = SleepCoordinator()
        try:
            with pytest.raises(UpstreamTimeoutError):
                await coordinator.acquire(client, level=1, drain_timeout_s=30)
            assert coordinator.holders == 0 and not coordinator.sleeping
        finally:
            await client.aclose()

    asyncio.run(run())
    assert is_sleeping(model_server.base_url) is False


def test_the_last_step_wakes_the_server(model_server: Any) -> None:
    async def run() -> list[bool]:
        client = VllmClient(model_server.base_url)
        coordinator = SleepCoordinator()
        seen = []
        try:
            await coordinator.acquire(client, level=1, drain_timeout_s=30)
            await coordinator.acquire(client, level=1, drain_timeout_s=30)  # a second step joins, no second sleep
            seen.append(await client.is_sleeping())
            assert await coordinator.release(client) is False  # the other step still needs the device
            seen.append(await client.is_sleeping())
            assert await coordinator.release(client) is True
            seen.append(await client.is_sleeping())
        finally:
            await client.aclose()
        return seen

    assert asyncio.run(run()) == [True, True, False]


def test_feedback_whose_sleep_times_out_leaves_the_server_awake(
    feedback_gateway: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    gw = feedback_gateway
    lora_id = new_lora(gw)
    forward = gw.transport.handle_async_request

    async def timing_out(request: httpx.Request) -> httpx.Response:
        response = await forward(request)
        if request.url.path == "/sleep":
            raise httpx.ReadTimeout("timed out waiting for /sleep", request=request)
        return response

    monkeypatch.setattr(gw.transport, "handle_async_request", timing_out)
    reply = feedback(gw, lora_id)
    monkeypatch.undo()
    assert reply.status_code == 504, reply.text
    assert is_sleeping(gw.model_server_url) is False


def test_chats_wait_for_a_step_instead_of_failing(feedback_gateway: Any) -> None:
    gw = feedback_gateway
    lora_id = new_lora(gw)
    result: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: result.setdefault("feedback", feedback(gw, lora_id)))
    thread.start()
    deadline = time.monotonic() + 120
    while not is_sleeping(gw.model_server_url) and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    chat = HTTP.post(f"{gw.v1}/chat/completions", json={"model": gw.base_model, "max_tokens": 4,
                                                         "messages": [{"role": "user", "content": QUESTION}]})
    thread.join()
    assert result["feedback"].status_code == 200, result["feedback"].text
    assert result["feedback"].json()["vllm"] == {"slept": True, "woke": True}
    assert chat.status_code == 200, chat.text  # served after the wake (the old code answered 503 mid-step)


def test_on_cpu_the_server_keeps_serving_during_a_step(
    feedback_gateway: Any, trainer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    gw = feedback_gateway
    assert LocalEngine(gw.settings, trainer=trainer).shares_inference_device is False  # the trainer is on CPU
    monkeypatch.setattr(gw.settings, "sleep_during_training", "auto")
    lora_id = new_lora(gw)
    since = len(gw.transport.calls)
    reply = feedback(gw, lora_id)
    assert reply.status_code == 200, reply.text
    assert reply.json()["vllm"] == {"slept": False, "woke": False}
    assert "/sleep" not in gw.transport.paths(since=since)


def test_a_server_found_asleep_at_start_is_woken(
    model_server: Any, trainer: Any, threaded_uvicorn: Any, tmp_path: Any
) -> None:
    assert HTTP.post(f"{model_server.base_url}/sleep", params={"level": 1}).status_code == 200
    assert is_sleeping(model_server.base_url) is True
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        vllm_base_url=model_server.base_url,
        lora_root=trainer.store.root,
        feedback_log_dir=tmp_path / "feedback",
        model_cache=trainer._cache_dir,
    )
    engine = LocalEngine(settings, trainer=trainer)
    try:
        with threaded_uvicorn(build_app(settings, engine=engine)):
            deadline = time.monotonic() + 60
            while is_sleeping(model_server.base_url) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert is_sleeping(model_server.base_url) is False
    finally:
        HTTP.post(f"{model_server.base_url}/wake_up")  # leave the shared server awake whatever happened
        asyncio.run(engine.close())
