"""Session fixtures for training tests: one resident trainer (the real SmolLM2 model) on a temporary store."""

from __future__ import annotations

from pathlib import Path

import pytest

from claas.core.config import get_settings
from claas.training.storage import LoraStore
from claas.training.trainer import DistillationTrainer


@pytest.fixture(scope="session")
def trainer_store(tmp_path_factory: pytest.TempPathFactory) -> LoraStore:
    return LoraStore(tmp_path_factory.mktemp("loras"))


@pytest.fixture(scope="session")
def trainer(trainer_store: LoraStore) -> DistillationTrainer:
    trainer = DistillationTrainer(
        base_model="smollm2-135m", store=trainer_store, cache_dir=Path(get_settings().model_cache), hot_adapters=4
    )
    trainer.ensure_loaded()
    return trainer
