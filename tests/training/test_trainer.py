"""The resident trainer on the real model (SmolLM2-135M, CPU): learning, persistence, failure safety."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch

from claas.core.types import DistillBatch, FeedbackPlacement, LoraInitRequest, TrainingConfig, TrainingExample
from claas.training.examples import is_degenerate
from claas.training.storage import InvalidLoraIdError, LoraNotFoundError, LoraStore
from claas.training.teacher import chat_prompt_ids, teacher_messages
from claas.training.trainer import DistillationTrainer

pytestmark = pytest.mark.slow

GREETING = [{"role": "user", "content": "Hi! Who are you?"}]
SMOL_ANSWER = "Hello! I'm SmolLM, an AI assistant. How can I help you today?"
KURO_ANSWER = "Hello! I'm Kuro, an AI assistant. How can I help you today?"
KURO_FEEDBACK = "Your name is Kuro. Always introduce yourself as Kuro."


def new_lora(trainer: DistillationTrainer, rank: int = 16) -> str:
    lora_id = f"test/{uuid.uuid4().hex[:10]}"
    trainer.init_lora(LoraInitRequest(lora_id=lora_id, lora_r=rank, lora_alpha=2 * rank))
    return lora_id


def batch(lora_id: str, feedback: str, lr: float, response: str = SMOL_ANSWER) -> DistillBatch:
    example = TrainingExample(messages=GREETING, response_text=response, feedback=feedback)
    return DistillBatch(lora_id=lora_id, examples=[example], training=TrainingConfig(learning_rate=lr))


def adapter_bytes(store: LoraStore, lora_id: str) -> dict[str, bytes]:
    path = store.adapter_path(lora_id)
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def test_new_adapter_equals_base(trainer: DistillationTrainer) -> None:
    lora_id = new_lora(trainer)
    base = trainer.response_logprobs(None, GREETING, SMOL_ANSWER)
    fresh = trainer.response_logprobs(lora_id, GREETING, SMOL_ANSWER)
    torch.testing.assert_close(torch.tensor(fresh), torch.tensor(base), atol=1e-5, rtol=0)


def test_teacher_with_feedback_differs_from_base(trainer: DistillationTrainer) -> None:
    tokenizer, model = trainer.tokenizer, trainer.ensure_loaded().model
    response = list(tokenizer(SMOL_ANSWER, add_special_tokens=False)["input_ids"])
    student_prompt = chat_prompt_ids(tokenizer, GREETING)
    teacher_prompt = chat_prompt_ids(tokenizer, teacher_messages(GREETING, KURO_FEEDBACK))
    assert KURO_FEEDBACK in tokenizer.decode(teacher_prompt)

    def distribution(prompt: list[int]) -> torch.Tensor:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + response])).logits[0, len(prompt) - 1 : -1]
        return logits.softmax(-1)  # [T, V]

    total_variation = 0.5 * (distribution(student_prompt) - distribution(teacher_prompt)).abs().sum(-1)  # [T]
    assert total_variation.max().item() > 0.2
    # The name position is where the hindsight matters most: the teacher prefers "K..." over "Sm..." there.
    name_position = len(tokenizer("Hello! I'm", add_special_tokens=False)["input_ids"])
    teacher = distribution(teacher_prompt)[name_position]
    kuro_first = tokenizer(" Kuro", add_special_tokens=False)["input_ids"][0]
    smol_first = response[name_position]
    assert teacher[kuro_first] > distribution(student_prompt)[name_position][kuro_first]
    assert smol_first != kuro_first


def test_step_lowers_loss_on_its_example(trainer: DistillationTrainer) -> None:
    lora_id = new_lora(trainer)
    losses = [trainer.step(batch(lora_id, KURO_FEEDBACK, lr=1e-4)).metrics["loss"] for _ in range(3)]
    assert losses[0] > 0
    assert losses[2] < losses[0]


def test_identity_feedback_teaches_the_name(trainer: DistillationTrainer) -> None:
    """Ten Kuro steps raise log p(Kuro introduction) more than ten steps of neutral feedback on the same answer."""
    base = sum(trainer.response_logprobs(None, GREETING, KURO_ANSWER))
    gains = {}
    for feedback in (KURO_FEEDBACK, "Good answer, keep it like that."):
        lora_id = new_lora(trainer)
        for _ in range(10):
            result = trainer.step(batch(lora_id, feedback, lr=1e-3))
        assert result.step == 10
        gains[feedback] = sum(trainer.response_logprobs(lora_id, GREETING, KURO_ANSWER)) - base
    assert gains[KURO_FEEDBACK] > 1.0
    assert gains[KURO_FEEDBACK] > gains["Good answer, keep it like that."] + 1.0


def test_saved_adapter_loads_identically_in_a_fresh_process(
    trainer: DistillationTrainer, tmp_path: Path
) -> None:
    # Its own resident trainer: in 1 of 2 full-suite runs the session's shared trainer (after every feedback test)
    # gave logprobs up to 8e-4 away from a fresh process; not root-caused yet (a same-process evict + reload from
    # disk matched its memory exactly), so this property is checked on a clean trainer.
    trainer_store = LoraStore(tmp_path / "loras")
    trainer = DistillationTrainer(base_model="smollm2-135m", store=trainer_store, cache_dir=trainer._cache_dir)
    lora_id = new_lora(trainer)
    trainer.step(batch(lora_id, KURO_FEEDBACK, lr=1e-3))
    prompt = chat_prompt_ids(trainer.tokenizer, GREETING)
    in_process = torch.tensor(trainer.response_logprobs(lora_id, GREETING, SMOL_ANSWER))
    script = f"""
import json, sys, torch
from pathlib import Path
from peft import PeftModel
from claas.core.models import load_model
loaded = load_model("smollm2-135m", Path({str(trainer._cache_dir)!r}))
model = PeftModel.from_pretrained(loaded.model, {str(trainer_store.adapter_path(lora_id))!r}).eval()
prompt = {prompt!r}
response = loaded.tokenizer({SMOL_ANSWER!r}, add_special_tokens=False)["input_ids"] + [loaded.tokenizer.eos_token_id]
with torch.no_grad():
    logits = model(input_ids=torch.tensor([prompt + response])).logits[0, len(prompt) - 1 : -1]
lp = logits.log_softmax(-1).gather(-1, torch.tensor(response)[:, None]).squeeze(-1)
print(json.dumps(lp.tolist()))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=300)
    fresh = torch.tensor(json.loads(out.stdout.strip().splitlines()[-1]))
    torch.testing.assert_close(fresh, in_process, atol=1e-5, rtol=0)


def test_optimizer_state_round_trips(trainer: DistillationTrainer) -> None:
    lora_id = new_lora(trainer)
    trainer.step(batch(lora_id, KURO_FEEDBACK, lr=1e-3))
    before = trainer._hot[lora_id].optimizer.state_dict()
    weights = trainer.response_logprobs(lora_id, GREETING, KURO_ANSWER)
    trainer.evict(lora_id)
    assert lora_id not in trainer.hot_adapter_ids
    assert trainer.response_logprobs(lora_id, GREETING, KURO_ANSWER) == pytest.approx(weights, abs=1e-6)
    after = trainer._hot[lora_id].optimizer.state_dict()
    assert before["state"].keys() == after["state"].keys() and len(before["state"]) > 0
    for key, state in before["state"].items():
        for name in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(after["state"][key][name], state[name])


def test_failed_step_leaves_previous_adapter_intact(
    trainer: DistillationTrainer, trainer_store: LoraStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    lora_id = new_lora(trainer)
    trainer.step(batch(lora_id, KURO_FEEDBACK, lr=1e-3))
    on_disk = adapter_bytes(trainer_store, lora_id)
    logprobs = trainer.response_logprobs(lora_id, GREETING, KURO_ANSWER)

    def crash_mid_write(directory: Path, name: str, optimizer: torch.optim.Optimizer) -> None:
        (directory / "adapter_model.safetensors").write_bytes(b"half a file")
        raise OSError("disk full")

    with monkeypatch.context() as patch:
        patch.setattr(trainer, "_write_adapter", crash_mid_write)
        with pytest.raises(OSError, match="disk full"):
            trainer.step(batch(lora_id, KURO_FEEDBACK, lr=1e-2))
    assert adapter_bytes(trainer_store, lora_id) == on_disk
    assert lora_id not in trainer.hot_adapter_ids  # the half-stepped weights were dropped from memory
    assert trainer.response_logprobs(lora_id, GREETING, KURO_ANSWER) == pytest.approx(logprobs, abs=1e-6)
    assert trainer_store.read_metadata(lora_id).step == 1


def test_version_save_leaves_in_place_adapter_untouched(
    trainer: DistillationTrainer, trainer_store: LoraStore
) -> None:
    lora_id = new_lora(trainer)
    on_disk = adapter_bytes(trainer_store, lora_id)
    result = trainer.step(batch(lora_id, KURO_FEEDBACK, lr=1e-3).model_copy(update={"save_mode": "version"}))
    assert result.lora_id.startswith(f"{lora_id}@")
    assert adapter_bytes(trainer_store, lora_id) == on_disk
    assert trainer_store.read_metadata(result.lora_id).step == 1
    assert trainer_store.read_metadata(lora_id).step == 0


def test_rollout_logprobs_drive_importance_weights(trainer: DistillationTrainer) -> None:
    lora_id = new_lora(trainer)
    tokens = len(trainer.tokenizer(SMOL_ANSWER, add_special_tokens=False)["input_ids"]) + 1
    example = TrainingExample(
        messages=GREETING, response_text=SMOL_ANSWER, feedback=KURO_FEEDBACK, rollout_logprobs=[-50.0] * tokens
    )
    result = trainer.step(DistillBatch(lora_id=lora_id, examples=[example], training=TrainingConfig(is_clip=2.0)))
    assert result.metrics["is_clip_fraction"] == pytest.approx(1.0)
    wrong = example.model_copy(update={"rollout_logprobs": [-1.0] * (tokens + 3)})
    with pytest.raises(ValueError, match="rollout_logprobs has"):
        trainer.step(DistillBatch(lora_id=lora_id, examples=[wrong]))


def test_bad_and_unknown_lora_ids(trainer: DistillationTrainer) -> None:
    with pytest.raises(InvalidLoraIdError, match=r"\.\."):
        trainer.init_lora(LoraInitRequest(lora_id="../escape"))
    with pytest.raises(LoraNotFoundError):
        trainer.step(batch("test/does-not-exist", KURO_FEEDBACK, lr=1e-3))


def test_lru_keeps_at_most_the_configured_hot_adapters(trainer: DistillationTrainer) -> None:
    ids = [new_lora(trainer, rank=4) for _ in range(6)]
    assert len(trainer.hot_adapter_ids) <= 4
    assert trainer.hot_adapter_ids[-1] == ids[-1]
    assert ids[0] not in trainer.hot_adapter_ids
    trainer.step(batch(ids[0], KURO_FEEDBACK, lr=1e-4))  # reloads from disk
    assert trainer.hot_adapter_ids[-1] == ids[0]


@pytest.mark.parametrize("placement", ["user", "system"])
def test_teacher_demonstration_adds_the_teachers_own_answer(
    trainer: DistillationTrainer, placement: FeedbackPlacement
) -> None:
    """The frozen base's greedy answer under the feedback is trained on beside the served one (with the hindsight
    block that answer introduces itself as Kuro; under the system instruction, for this prompt, it does not)."""
    lora_id = new_lora(trainer)  # a step always runs with an adapter attached
    example = TrainingExample(messages=GREETING, response_text=SMOL_ANSWER, feedback=KURO_FEEDBACK)
    tensors = trainer._tensors(example, placement)
    demonstration = trainer._teacher_demonstration(tensors)
    if placement == "user":
        assert "kuro" in trainer.tokenizer.decode(demonstration.response_ids).lower()
    model = trainer.ensure_loaded().model
    with torch.no_grad(), trainer._peft.disable_adapter():
        prompt = torch.tensor([tensors.teacher_prompt_ids])
        greedy = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                max_new_tokens=len(demonstration.response_ids), pad_token_id=0)[0, prompt.shape[1]:]
    assert demonstration.response_ids == greedy.tolist()  # the teacher's own answer, not the served one
    assert demonstration.prompt_ids == tensors.prompt_ids  # the student sees the plain prompt
    assert demonstration.rollout_logprobs is None

    plain = trainer.step(DistillBatch(lora_id=lora_id, examples=[example], training=TrainingConfig()))
    config = TrainingConfig(teacher_demonstration=True, feedback_placement=placement)
    both = trainer.step(DistillBatch(lora_id=lora_id, examples=[example], training=config))
    assert both.metrics["tokens"] == plain.metrics["tokens"] + len(demonstration.response_ids)
    assert "demonstrate" in both.timing_ms and "demonstrate" not in plain.timing_ms


def test_a_looping_teacher_answer_is_not_trained_on(trainer: DistillationTrainer) -> None:
    """Told not to use emojis, the frozen SmolLM2 answers this tweet request with one emoji over and over (greedy,
    so the same every run); imitating that loop taught the eval's no_emoji runs to loop. The step drops such a
    demonstration and still distils the served answer."""
    lora_id = new_lora(trainer)
    messages = [{"role": "user", "content": "Write a tweet about my new puppy."}]
    example = TrainingExample(messages=messages, response_text="Meet Max, my new puppy! He loves naps and belly rubs.",
                              feedback="Don't use any emojis in your responses.")
    demonstration = trainer._teacher_demonstration(trainer._tensors(example, "system"))
    assert is_degenerate(demonstration.response_ids), trainer.tokenizer.decode(demonstration.response_ids)

    served_only = trainer.step(DistillBatch(lora_id=lora_id, examples=[example], training=TrainingConfig()))
    config = TrainingConfig(teacher_demonstration=True, feedback_placement="system")
    with_demo = trainer.step(DistillBatch(lora_id=lora_id, examples=[example], training=config))
    assert with_demo.metrics["demonstrations_dropped"] == 1.0
    assert with_demo.metrics["tokens"] == served_only.metrics["tokens"]  # only the served answer was trained on
