"""Against the real clouds; skipped unless credentials are set (MODAL_TOKEN_ID / CLAAS_TINKER_API_KEY)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from claas.core.config import Settings
from claas.core.types import DistillBatch, LoraInitRequest, TrainingConfig, TrainingExample

pytestmark = pytest.mark.integration

EXAMPLE = TrainingExample(messages=[{"role": "user", "content": "Who are you?"}], response_text="I am an assistant.",
                          feedback="Your name is Kuro.")


@pytest.mark.skipif(not os.environ.get("CLAAS_TINKER_API_KEY"), reason="needs CLAAS_TINKER_API_KEY")
def test_tinker_init_step_delete(tmp_path: Path) -> None:
    from claas.training.engine.tinker import TinkerEngine

    engine = TinkerEngine(Settings(lora_root=tmp_path))  # key and base model from the environment

    async def run() -> int:
        try:
            await engine.init_lora(LoraInitRequest(lora_id="ci/tinker"))
            batch = DistillBatch(lora_id="ci/tinker", examples=[EXAMPLE], training=TrainingConfig(teacher_top_k=20))
            return (await engine.distill(batch)).step
        finally:
            if await engine.lora_exists("ci/tinker"):
                await engine.delete_lora("ci/tinker")
            await engine.close()

    assert asyncio.run(run()) == 1


@pytest.mark.skipif(not os.environ.get("MODAL_TOKEN_ID"), reason="needs MODAL_TOKEN_ID (and a deployed claas app)")
def test_modal_deployed_worker_steps(tmp_path: Path) -> None:
    """Needs `modal deploy -m claas.deploy` first; calls the deployed worker, reads the Volume through it."""
    import modal

    from claas.training.engine.modal import WORKER_CLASS

    settings = Settings()
    worker = modal.Cls.from_name(settings.modal_app_name, WORKER_CLASS)()
    info = worker.init_lora.remote({"lora_id": "ci/modal-" + os.urandom(3).hex()})
    batch = DistillBatch(lora_id=info["lora_id"], examples=[EXAMPLE])
    assert worker.distill.remote(batch.model_dump(mode="json"))["step"] == 1
