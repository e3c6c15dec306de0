"""Two trainers (as two API processes would hold) on ONE adapter root: no update is lost (issue 8, finding 1).

Each trainer keeps a hot in-memory copy; a step must start from the current on-disk snapshot, not from a copy
that another trainer has since superseded.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import torch
from peft import get_peft_model_state_dict
from safetensors.torch import load_file

from claas.core.types import DistillBatch, LoraInitRequest, TrainingConfig, TrainingExample
from claas.training.storage import LoraStore
from claas.training.trainer import DistillationTrainer

pytestmark = pytest.mark.slow

GREETING = [{"role": "user", "content": "Hi! Who are you?"}]
ANSWER = "Hello! I'm SmolLM, an AI assistant. How can I help you today?"


@pytest.fixture(scope="module")
def second_trainer(trainer: DistillationTrainer) -> DistillationTrainer:
    """Another resident trainer with its own LoraStore object on the same root (what a second process has)."""
    other = DistillationTrainer(
        base_model=trainer.base_model, store=LoraStore(trainer.store.root), cache_dir=trainer._cache_dir, hot_adapters=2
    )
    other.ensure_loaded()
    return other


def _batch(lora_id: str) -> DistillBatch:
    example = TrainingExample(messages=GREETING, response_text=ANSWER, feedback="Introduce yourself as Kuro.")
    return DistillBatch(lora_id=lora_id, examples=[example], training=TrainingConfig(learning_rate=1e-3))


def _saved_weights(store: LoraStore, lora_id: str) -> dict[str, torch.Tensor]:
    return load_file(str(store.snapshot_path(lora_id) / "adapter_model.safetensors"))


def _optimizer_steps(store: LoraStore, lora_id: str) -> int:
    state = torch.load(store.snapshot_path(lora_id) / "optimizer_state.pt", weights_only=True)["state"]
    return int(next(iter(state.values()))["step"])


def test_alternating_trainers_lose_no_update(trainer: DistillationTrainer, second_trainer: DistillationTrainer) -> None:
    lora_id = f"shared/{uuid.uuid4().hex[:10]}"
    trainer.init_lora(LoraInitRequest(lora_id=lora_id, lora_r=4, lora_alpha=8))
    schedule = [trainer, second_trainer, trainer, second_trainer, trainer]
    saved: list[dict[str, torch.Tensor]] = []
    for number, who in enumerate(schedule, start=1):
        result = who.step(_batch(lora_id))
        assert result.step == number  # each step starts from the previous one, whoever made it
        saved.append(_saved_weights(trainer.store, lora_id))
    store = LoraStore(Path(trainer.store.root))
    assert store.read_metadata(lora_id).step == len(schedule)
    assert _optimizer_steps(store, lora_id) == len(schedule)  # the AdamW state carried every step, too
    # The last writer's in-memory copy is what is on disk, and every save moved the weights.
    last = saved[-1]
    for a, b in zip(saved, saved[1:]):
        assert any(not torch.equal(a[k], b[k]) for k in a)
    hot = trainer._hot[lora_id]
    assert hot.snapshot == store.snapshot_path(lora_id)
    in_memory = get_peft_model_state_dict(trainer._peft, adapter_name=hot.peft_name, save_embedding_layers=False)
    assert in_memory.keys() == last.keys()
    for key, tensor in last.items():
        torch.testing.assert_close(in_memory[key].detach().cpu(), tensor, atol=0, rtol=0)
