"""The gateway in tinker mode, no vLLM anywhere: chat through Tinker's sampler (fake cloud, real SmolLM2), one
feedback trains the adapter on the served tokens, and the next answer changes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from tinker_fakes import FakeRestClient, FakeServiceClient, FakeTinkerCloud, tinker_settings

from claas.api import build_app
from claas.training.engine.tinker import TinkerEngine

pytestmark = pytest.mark.slow

MESSAGES = [{"role": "user", "content": "Who are you?"}]


def _chat(client: TestClient, **extra: Any) -> dict[str, Any]:
    body = {"model": "tk/kuro", "messages": MESSAGES, "max_tokens": 16, "temperature": 0.0, **extra}
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def test_feedback_in_tinker_mode_trains_and_changes_the_next_answer(
    tinker_cloud: FakeTinkerCloud, tmp_path: Path
) -> None:
    # Nothing listens on this port: every chat below is served by the Tinker sampling backend.
    settings = tinker_settings(tmp_path, vllm_base_url="http://127.0.0.1:9")
    http = httpx.AsyncClient(transport=httpx.MockTransport(tinker_cloud.serve_file))
    engine = TinkerEngine(settings, service=FakeServiceClient(tinker_cloud), rest=FakeRestClient(tinker_cloud),
                          http=http)
    app = build_app(settings, engine=engine)
    with TestClient(app) as client:
        created = client.post("/v1/lora/init", json={"lora_id": "tk/kuro", "lora_r": 8})
        assert created.status_code == 200, created.text
        models = [card["id"] for card in client.get("/v1/models").json()["data"]]
        assert models == ["smollm2-135m", "tk/kuro"]

        first = _chat(client)["choices"][0]["message"]["content"]
        score = {"model": "tk/kuro", "messages": MESSAGES, "completion": first}
        before = client.post("/v1/score", json=score).json()["sum_logprob"]

        feedback = client.post("/v1/feedback", json={
            "lora_id": "tk/kuro", "prompt": "Who are you?", "response": first,
            "feedback": "Your name is Kuro. Always introduce yourself as Kuro.",
            "training": {"learning_rate": 2e-3, "teacher_top_k": 20, "steps": 2},
        })
        assert feedback.status_code == 200, feedback.text
        body = feedback.json()
        assert body["sources"] == ["cache"]  # trained on the exact served tokens
        assert body["vllm"] == {"slept": False, "woke": False}
        assert body["distill_result"]["step"] == 2
        assert body["distill_result"]["metrics"]["tokens"] > 0

        second = _chat(client)["choices"][0]["message"]["content"]
        after = client.post("/v1/score", json=score).json()["sum_logprob"]
        assert second != first
        assert after < before  # the criticised answer became less likely

        with client.stream("POST", "/v1/chat/completions", json={
            "model": "tk/kuro", "messages": MESSAGES, "max_tokens": 16, "temperature": 0.0, "stream": True,
        }) as stream:
            events = [line[6:] for line in stream.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        text = "".join((c.get("delta") or {}).get("content") or "" for e in events[:-1]
                       for c in json.loads(e).get("choices", []))
        assert text == second
    print(f"\ntinker gateway: before={first!r} after={second!r} logp(first) {before:.2f} -> {after:.2f}")
