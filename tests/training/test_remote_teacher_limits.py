"""The default teacher_top_k (100) against a vLLM-compatible teacher that returns at most 20 logprobs (vLLM's default
--max-logprobs, mirrored by our model server): the teacher clamps to what the server returns instead of failing
every remote-teacher step (issue 8)."""

from __future__ import annotations

import uuid

import pytest

from claas.core.types import DistillBatch, LoraInitRequest, TrainingConfig, TrainingExample
from claas.training.teacher import RemoteTeacher, chat_prompt_ids, teacher_messages

pytestmark = pytest.mark.slow

MESSAGES = [{"role": "user", "content": "Hi! Who are you?"}]
RESPONSE = "Hello! I'm SmolLM, an AI assistant."
FEEDBACK = "Your name is Kuro."


def test_default_top_k_is_clamped_to_the_servers_limit(model_server, trainer, monkeypatch) -> None:
    remote = RemoteTeacher(model_server.base_url, model_server.model)
    try:
        tokenizer = trainer.tokenizer
        prompt = chat_prompt_ids(tokenizer, teacher_messages(MESSAGES, FEEDBACK))
        response = list(tokenizer(RESPONSE, add_special_tokens=False)["input_ids"])
        scores = remote.score(prompt, response, top_k=100)
        assert remote.max_top_k == 20 and scores.ids.shape == (len(response), 20)
        lora_id = f"remote/{uuid.uuid4().hex[:8]}"
        trainer.init_lora(LoraInitRequest(lora_id=lora_id, lora_r=4, lora_alpha=8))
        monkeypatch.setattr(trainer, "_remote_teacher", remote)
        example = TrainingExample(messages=MESSAGES, response_text=RESPONSE, feedback=FEEDBACK)
        config = TrainingConfig(teacher_mode="remote", teacher_top_k=100, learning_rate=1e-3)
        result = trainer.step(DistillBatch(lora_id=lora_id, examples=[example], training=config))
        assert result.step == 1 and result.metrics["grad_norm"] > 0
    finally:
        remote.close()
