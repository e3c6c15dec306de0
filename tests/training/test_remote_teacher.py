"""The remote teacher against a real vLLM-compatible server (our model server serving the same SmolLM2 weights):
its top-K scores must equal the local frozen-base teacher's, and a step with teacher_mode=remote must train."""

from __future__ import annotations

import contextlib
import uuid

import httpx
import pytest
import torch

from claas.core.types import DistillBatch, LoraInitRequest, TrainingConfig, TrainingExample
from claas.training.teacher import RemoteTeacher, TeacherError, chat_prompt_ids, teacher_messages

pytestmark = pytest.mark.slow

MESSAGES = [{"role": "user", "content": "Hi! Who are you?"}]
RESPONSE = "Hello! I'm SmolLM, an AI assistant."
FEEDBACK = "Your name is Kuro. Always introduce yourself as Kuro."


@pytest.fixture
def remote(model_server):
    teacher = RemoteTeacher(model_server.base_url, model_server.model)
    yield teacher
    teacher.close()


def test_remote_scores_equal_the_local_teacher(remote, trainer) -> None:
    tokenizer = trainer.tokenizer
    remote.check_tokenizer(tokenizer)
    prompt = chat_prompt_ids(tokenizer, teacher_messages(MESSAGES, FEEDBACK))
    response = list(tokenizer(RESPONSE, add_special_tokens=False)["input_ids"])
    scores = remote.score(prompt, response, top_k=5)
    assert scores.logprobs.shape == scores.ids.shape == (len(response), 5)
    model = trainer.ensure_loaded().model
    frozen_base = trainer._peft.disable_adapter() if trainer._peft is not None else contextlib.nullcontext()
    with torch.no_grad(), frozen_base:
        logits = model(input_ids=torch.tensor([prompt + response])).logits[0, len(prompt) - 1 : -1]
    local = logits.float().log_softmax(-1).topk(5, dim=-1)
    torch.testing.assert_close(scores.logprobs, local.values, atol=1e-4, rtol=0)
    assert torch.equal(scores.ids, local.indices)


def test_a_different_tokenizer_is_refused(remote) -> None:
    class ShiftedTokenizer:
        def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
            return {"input_ids": [7] * len(text)}

    with pytest.raises(TeacherError, match="tokenizes differently"):
        remote.check_tokenizer(ShiftedTokenizer())


def test_unreachable_teacher_is_a_clear_error(unused_port_url: str) -> None:
    teacher = RemoteTeacher(unused_port_url, "big-model")
    with pytest.raises(TeacherError, match="unreachable"):
        teacher.score([1, 2], [3], top_k=2)


def test_step_with_remote_teacher_trains(remote, trainer, monkeypatch: pytest.MonkeyPatch) -> None:
    lora_id = f"remote/{uuid.uuid4().hex[:8]}"
    trainer.init_lora(LoraInitRequest(lora_id=lora_id, lora_r=8, lora_alpha=16))
    monkeypatch.setattr(trainer, "_remote_teacher", remote)
    example = TrainingExample(messages=MESSAGES, response_text=RESPONSE, feedback=FEEDBACK)
    config = TrainingConfig(teacher_mode="remote", teacher_top_k=20, learning_rate=1e-3)
    before = trainer.response_logprobs(lora_id, MESSAGES, RESPONSE)
    result = trainer.step(DistillBatch(lora_id=lora_id, examples=[example], training=config))
    assert result.step == 1 and result.metrics["loss"] > 0 and result.metrics["grad_norm"] > 0
    assert trainer.response_logprobs(lora_id, MESSAGES, RESPONSE) != pytest.approx(before, abs=1e-4)


@pytest.fixture
def unused_port_url(free_port_factory) -> str:
    port = free_port_factory()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
    return f"http://127.0.0.1:{port}"


def test_trainer_renders_chats_like_the_server(model_server, trainer) -> None:
    """Feedback on text the gateway never served is tokenized by the trainer; it must match what the server would
    have rendered for the same messages, multi-part content included."""
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "First part."}, {"type": "text", "text": "Second."}]},
    ]
    served = httpx.post(f"{model_server.base_url}/tokenize", timeout=60, json={
        "model": model_server.model, "messages": messages, "add_generation_prompt": True}).json()["tokens"]
    assert chat_prompt_ids(trainer.tokenizer, messages) == served
