"""The product's promise, guarded as an outcome: with the service's default training settings and the real model,
ten identity feedbacks on answers the gateway served make the model introduce itself as Kuro on prompts it was
never trained on, while it still knows the capital of France. (The "log p rose" check in test_trainer.py is the
mechanism; this is what a user sees.)"""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletion

pytestmark = pytest.mark.slow

FEEDBACK = "Your name is Kuro. Always introduce yourself as Kuro."
TRAINING_PROMPTS = ["Who are you?", "Introduce yourself.", "What's your name?", "Hi! Tell me a bit about yourself.",
                    "Hello, what should I call you?"]  # fmt: skip
HELD_OUT = ["Tell me about yourself in one sentence.", "Hey there! Who am I talking to?",
            "Before we start, please introduce yourself.", "What is your name, assistant?",
            "Can you say who you are?", "Good morning! Who is this?"]  # fmt: skip
FEEDBACKS = 10


def test_ten_default_feedbacks_teach_the_name_on_held_out_prompts(feedback_gateway: Any) -> None:
    http = httpx.Client(base_url=feedback_gateway.v1, timeout=900)
    client = openai.OpenAI(base_url=feedback_gateway.v1, api_key="unused")
    lora_id = f"teach/{uuid.uuid4().hex[:10]}"
    assert http.post("/lora/init", json={"lora_id": lora_id}).status_code == 200  # default rank and alpha

    def greedy(model: str, prompt: str, max_tokens: int = 40) -> str:
        reply = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": prompt}], temperature=0, max_tokens=max_tokens
        )
        return reply.choices[0].message.content or ""

    before = [greedy(lora_id, prompt) for prompt in HELD_OUT]
    assert not any("kuro" in answer.lower() for answer in before), before

    for round_index in range(FEEDBACKS):
        prompt = TRAINING_PROMPTS[round_index % len(TRAINING_PROMPTS)]
        raw = client.chat.completions.with_raw_response.create(
            model=lora_id, messages=[{"role": "user", "content": prompt}], max_tokens=64, temperature=0.7,
            seed=round_index, stream=False,
        )
        completion = raw.parse()
        assert isinstance(completion, ChatCompletion)
        answer = completion.choices[0].message.content or ""
        reply = http.post("/feedback", json={  # no `training` block: the service's defaults
            "lora_id": lora_id, "prompt": prompt, "response": answer, "feedback": FEEDBACK,
            "completion_id": raw.headers["x-claas-completion-id"]})  # fmt: skip
        assert reply.status_code == 200, reply.text
        assert reply.json()["sources"] == ["cache"]  # trained on exactly what was served

    after = [greedy(lora_id, prompt) for prompt in HELD_OUT]
    says_kuro = sum("kuro" in answer.lower() for answer in after)
    assert says_kuro >= 5, after  # >= 80 % of the held-out prompts
    assert "paris" in greedy(lora_id, "What is the capital of France?", 24).lower()
