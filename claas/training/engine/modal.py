"""ModalEngine: SDPO steps on the deployed Modal DistillWorker; the LoRA lifecycle on the mounted Volume.

`distill` and `init_lora` (they need the model) go to the worker: `modal.Cls.from_name(app, "DistillWorker")()`
then `.<method>.remote.aio(payload)` with plain dicts, under `CLAAS_MODAL_TIMEOUT_S`. List, exists, export, delete and
runtime refs read the same `claas-loras` Volume where this gateway has it mounted (the Modal ASGI app of
claas.deploy mounts it at the adapter root), reloading before reads and committing after writes. Modal's errors
become 503s saying what to do (`remote_errors.modal_errors`). Training never shares the inference server's device:
no sleep.

Not here: the worker's body (modal_worker), the Modal app (claas.deploy).
"""

from __future__ import annotations

import asyncio
from typing import Any

from claas.core.config import Settings
from claas.core.types import DistillBatch, DistillResult, LoraInfo, LoraInitRequest, LoraRuntimeRef
from claas.training.engine.base import TrainingEngine
from claas.training.engine.info import lora_info
from claas.training.engine.remote_errors import RemoteEngineError, modal_errors
from claas.training.volume_store import VolumeLike, VolumeLoraStore

WORKER_CLASS = "DistillWorker"


class ModalEngine(TrainingEngine):
    kind = "modal"
    # The worker has its own GPU; the inference server keeps serving during a step.
    shares_inference_device = False

    def __init__(self, settings: Settings, *, worker: Any | None = None, volume: VolumeLike | None = None) -> None:
        """`worker` is an instance of the deployed class (default: looked up by name, lazily, no network here);
        `volume` the adapter Volume (default: `modal.Volume.from_name(CLAAS_MODAL_VOLUME_NAME)`)."""
        self.app_name = settings.modal_app_name
        self.timeout_s = settings.modal_timeout_s
        if worker is None or volume is None:
            import modal

            worker = worker or modal.Cls.from_name(self.app_name, WORKER_CLASS)()
            volume = volume or modal.Volume.from_name(settings.modal_volume_name)
        self.worker: Any = worker
        self.store = VolumeLoraStore(settings.lora_root, volume)

    async def _call(self, method: str, payload: dict[str, Any]) -> dict[str, Any]:
        with modal_errors(method, self.app_name):
            call = getattr(self.worker, method).remote.aio(payload)
            try:
                return await asyncio.wait_for(call, timeout=self.timeout_s)
            except TimeoutError:
                raise RemoteEngineError(
                    f"modal {method}: no answer from the DistillWorker within {self.timeout_s:g}s "
                    "(CLAAS_MODAL_TIMEOUT_S); it may be cold-starting: retry"
                ) from None

    async def _on_volume(self, fn: Any) -> Any:
        with modal_errors("reading the adapter volume", self.app_name):
            return await asyncio.to_thread(fn)

    async def warmup(self) -> None:
        """Nothing to load here; the worker loads the model in its own container (`@modal.enter`)."""

    async def distill(self, batch: DistillBatch) -> DistillResult:
        return DistillResult.model_validate(await self._call("distill", batch.model_dump(mode="json")))

    async def init_lora(self, request: LoraInitRequest) -> LoraInfo:
        return LoraInfo.model_validate(await self._call("init_lora", request.model_dump(mode="json")))

    async def list_loras(self, prefix: str = "") -> list[LoraInfo]:
        entries = await self._on_volume(lambda: self.store.list(prefix))
        return [lora_info(entry.metadata, entry.aliases) for entry in entries]

    async def export_lora(self, lora_id: str) -> bytes:
        return await self._on_volume(lambda: self.store.export_zip(lora_id))

    async def delete_lora(self, lora_id: str) -> None:
        # The worker's hot copy goes stale by itself: its freshness check finds the snapshot gone on the next use.
        await self._on_volume(lambda: self.store.delete(lora_id))

    async def lora_exists(self, lora_id: str) -> bool:
        return await self._on_volume(lambda: self.store.exists(lora_id))

    async def lora_runtime_ref(self, lora_id: str) -> LoraRuntimeRef:
        path = await self._on_volume(lambda: self.store.adapter_path(lora_id))
        return LoraRuntimeRef(name=lora_id, path=str(path))

    async def health(self) -> dict[str, Any]:
        return {"engine": self.kind, "app": self.app_name, "lora_root": str(self.store.root)}

    async def close(self) -> None:
        return None
