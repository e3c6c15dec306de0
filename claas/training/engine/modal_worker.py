"""DistillWorkerCore: what the Modal DistillWorker runs, as a plain class (claas.deploy wraps it in `@app.cls`).

The same `DistillationTrainer` as the local engine, on a `VolumeLoraStore` (the `claas-loras` Volume mounted at the
adapter root): the base model is loaded once per container (`load`, called from `@modal.enter`), each call reloads
the Volume before reading and the store commits after each save. Payloads are plain dicts in and out (Modal pickles
arguments; dicts keep the gateway and the worker free to be on different CLaaS versions of the pydantic models).

Not here: Modal decorators (claas.deploy), the gateway side (claas.training.engine.modal).
"""

from __future__ import annotations

from typing import Any

from claas.core.config import Settings
from claas.core.types import DistillBatch, LoraInitRequest
from claas.training.volume_store import VolumeLike, VolumeLoraStore


class DistillWorkerCore:
    def __init__(self, settings: Settings, volume: VolumeLike) -> None:
        from claas.training.trainer import DistillationTrainer

        self.store = VolumeLoraStore(settings.lora_root, volume)
        self.trainer = DistillationTrainer.from_settings(settings, self.store)

    def load(self) -> None:
        self.trainer.ensure_loaded()

    def distill(self, payload: dict[str, Any]) -> dict[str, Any]:
        batch = DistillBatch.model_validate(payload)
        self.store.refresh()  # another container may have stepped this adapter: the trainer's freshness check sees it
        return self.trainer.step(batch).model_dump()

    def init_lora(self, payload: dict[str, Any]) -> dict[str, Any]:
        from claas.training.engine.info import lora_info

        request = LoraInitRequest.model_validate(payload)
        self.store.refresh()
        return lora_info(self.trainer.init_lora(request)).model_dump()

    def health(self) -> dict[str, Any]:
        return self.trainer.health()
