"""The product path with a real OpenClaw 2026.9.6 gateway: a chat through OpenClaw is answered by our model through
CLaaS, and feedback on that turn trains on exactly the completion CLaaS served (`sources: ["cache"]`), whether it is
sent by hand with the words and the answer the user saw, or by the claas-feedback plugin's `/feedback` command
running inside the gateway.

What OpenClaw changes (measured, the cause of the old cache miss): the upstream user turn is
`[<timestamp>] <words>\\n\\nRuntime: ...`, its system prompt is its own (~8.4K characters with the minimal
settings), and an answer cut at the token limit is shown with a `⚠️ Reply truncated ...` paragraph appended.

Kept lean: one chat and one feedback step per test, 8 answer tokens."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.openclaw.conftest import LEAN_TRAINING, ClaasApi, OpenClawGateway

pytestmark = pytest.mark.slow

QUESTION = "What is the capital of France?"


def _chat(gateway: OpenClawGateway, user: str) -> str:
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=gateway.token, timeout=600.0, max_retries=0)
    reply = client.chat.completions.create(
        model="openclaw/default",
        messages=[{"role": "user", "content": QUESTION}],
        max_completion_tokens=8,
        user=user,  # OpenClaw derives the session key agent:main:openai-user:<user> from it
        extra_headers=gateway.headers,
    )
    answer = reply.choices[0].message.content or ""
    assert answer.strip(), f"OpenClaw returned no answer:\n{gateway.log_tail()}"
    return answer


def _step(api: ClaasApi, lora_id: str) -> int:
    with api.client() as client:
        loras = client.get("/v1/lora", params={"prefix": lora_id}).raise_for_status().json()["loras"]
    return int(next(lora["step"] for lora in loras if lora["lora_id"] == lora_id))


def _cache_entries(api: ClaasApi) -> float:
    with api.client() as client:
        text = client.get("/metrics").raise_for_status().text
    return next(float(line.split()[-1]) for line in text.splitlines()
                if line.startswith("claas_completion_cache_entries "))


def _records(api: ClaasApi) -> list[Path]:
    return sorted(api.feedback_dir.glob("*/*.json")) if api.feedback_dir.exists() else []


def test_chat_through_openclaw_then_feedback_trains_on_the_served_completion(
    openclaw_gateway: OpenClawGateway, claas_api: ClaasApi
) -> None:
    lora_id = openclaw_gateway.lora_id
    before_entries, before_step = _cache_entries(claas_api), _step(claas_api, lora_id)
    answer = _chat(openclaw_gateway, user=f"hand-{uuid.uuid4().hex[:6]}")
    assert _cache_entries(claas_api) == before_entries + 1  # our model answered, through CLaaS's proxy

    with claas_api.client() as client:
        reply = client.post("/v1/feedback", json={
            "lora_id": lora_id, "prompt": QUESTION, "response": answer, "feedback": "Answer with the city name.",
            "training": LEAN_TRAINING,
        })
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["sources"] == ["cache"], body
    assert _step(claas_api, lora_id) == before_step + 1
    record: dict[str, Any] = json.loads(Path(body["feedback_log_path"]).read_text())
    trained = record["items"][0]
    assert trained["source"] == "cache" and trained["completion_id"].startswith("chatcmpl-")
    assert trained["trained_response"].strip() and trained["trained_response"] in answer  # served text, no notice


def test_feedback_command_of_the_plugin_inside_openclaw_trains_on_the_last_turn(
    openclaw_gateway: OpenClawGateway, claas_api: ClaasApi
) -> None:
    user = f"plugin-{uuid.uuid4().hex[:6]}"
    lora_id = openclaw_gateway.lora_id
    before_step, before_records = _step(claas_api, lora_id), set(_records(claas_api))
    answer = _chat(openclaw_gateway, user=user)

    feedback = "Answer in one short sentence."
    session_key = f"agent:main:openai-user:{user}"  # the HTTP chat's session; chat.send runs slash commands in it
    started = openclaw_gateway.call("chat.send", {"sessionKey": session_key, "message": f"/feedback {feedback}",
                                                  "idempotencyKey": uuid.uuid4().hex})
    assert started.get("status") in ("started", "ok"), started

    new: list[Path] = []
    deadline = time.monotonic() + 600
    while not new and time.monotonic() < deadline:
        time.sleep(1)
        new = [path for path in _records(claas_api) if path not in before_records]
    assert new, f"CLaaS received no feedback from the plugin:\n{openclaw_gateway.log_tail()}"
    record = json.loads(new[0].read_text())
    assert record["status"] == "ok", record["error"]
    item = record["items"][0]
    assert item["feedback"] == feedback
    assert QUESTION in item["prompt"]  # the last user turn, as OpenClaw gave it to the model
    assert item["source"] == "cache" and item["completion_id"].startswith("chatcmpl-")
    assert item["trained_response"] in answer
    assert _step(claas_api, lora_id) == before_step + 1

    # The plugin's reply lands in the chat: the loss and the time it took.
    reply_text = ""
    deadline = time.monotonic() + 60
    while "Trained" not in reply_text and time.monotonic() < deadline:
        history = openclaw_gateway.call("chat.history", {"sessionKey": session_key, "limit": 4})
        texts = [part.get("text", "") if isinstance(part, dict) else str(part)
                 for message in history.get("messages", []) if message.get("role") == "assistant"
                 for part in (message["content"] if isinstance(message["content"], list) else [message["content"]])]
        reply_text = next((text for text in reversed(texts) if "Trained" in text), "")
        time.sleep(1)
    assert f"Trained {lora_id}" in reply_text and "loss" in reply_text and "cache" in reply_text, reply_text


def test_a_prompt_longer_than_the_context_is_a_400_saying_so(claas_api: ClaasApi, openclaw_gateway: OpenClawGateway
                                                             ) -> None:
    """What OpenClaw's default settings send SmolLM2 (a ~16K-token system prompt, streamed, with include_usage and
    max_completion_tokens) without CLAAS_CONTEXT_OVERFLOW=trim: vLLM's 400 naming both lengths, never a 500."""
    client = openai.OpenAI(base_url=f"{claas_api.url}/v1", api_key="none", max_retries=0, timeout=300.0)
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model=openclaw_gateway.lora_id, stream=True, stream_options={"include_usage": True},
            max_completion_tokens=16,
            messages=[{"role": "system", "content": [{"type": "text", "text": "hello " * 16000}]},
                      {"role": "user", "content": [{"type": "text", "text": QUESTION}]}],
        )
    assert "maximum context length is 8192 tokens" in str(err.value)
