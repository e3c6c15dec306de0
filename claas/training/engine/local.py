"""LocalEngine: the resident DistillationTrainer behind an async interface.

Every torch call runs on one dedicated worker thread, so the event loop never blocks and two steps never interleave
(the per-LoRA locks in the feedback transaction order requests; this thread orders the GPU/CPU work). Storage-only
queries (list, exists) run on the default thread pool.
"""

from __future__ import annotations

import asyncio
import contextvars
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, TypeVar

from claas.core.config import Settings
from claas.core.models import pick_device
from claas.core.types import DistillBatch, DistillResult, LoraInfo, LoraInitRequest, LoraRuntimeRef
from claas.training.engine.base import TrainingEngine
from claas.training.engine.info import lora_info
from claas.training.storage import LoraStore
from claas.training.teacher import RemoteTeacher
from claas.training.trainer import DistillationTrainer

T = TypeVar("T")


class LocalEngine(TrainingEngine):
    kind = "local"

    def __init__(self, settings: Settings, *, trainer: DistillationTrainer | None = None) -> None:
        # A trainer handed in (tests, benchmarks share one resident model) brings its own store.
        self.store = trainer.store if trainer is not None else LoraStore(settings.lora_root)
        remote = None
        if settings.remote_teacher_url and settings.remote_teacher_model:
            remote = RemoteTeacher(settings.remote_teacher_url, settings.remote_teacher_model)
        self.trainer = trainer or DistillationTrainer.from_settings(settings, self.store, remote)
        self._remote_teacher = remote
        # Training on an accelerator shares it with the co-located inference server, which must then sleep; on
        # CPU they share no accelerator memory, so the server keeps serving during a step.
        loaded = self.trainer._loaded
        device = loaded.device if loaded is not None else pick_device(self.trainer._device_preference)
        self.shares_inference_device = device.type != "cpu"
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="claas-train")

    async def _on_worker(self, fn: Callable[[], T]) -> T:
        # In a copy of the caller's context: an adapter lock the calling request holds authorizes the write there.
        context = contextvars.copy_context()
        return await asyncio.get_running_loop().run_in_executor(self._worker, lambda: context.run(fn))

    async def warmup(self) -> None:
        """Load the base model now instead of on the first request."""
        await self._on_worker(self.trainer.ensure_loaded)
        remote = self._remote_teacher
        if remote is not None:
            await self._on_worker(lambda: remote.check_tokenizer(self.trainer.tokenizer))

    async def distill(self, batch: DistillBatch) -> DistillResult:
        return await self._on_worker(lambda: self.trainer.step(batch))

    async def init_lora(self, request: LoraInitRequest) -> LoraInfo:
        metadata = await self._on_worker(lambda: self.trainer.init_lora(request))
        return lora_info(metadata)

    async def list_loras(self, prefix: str = "") -> list[LoraInfo]:
        entries = await asyncio.to_thread(self.store.list, prefix)
        return [lora_info(entry.metadata, entry.aliases) for entry in entries]

    async def export_lora(self, lora_id: str) -> bytes:
        return await asyncio.to_thread(self.store.export_zip, lora_id)

    async def delete_lora(self, lora_id: str) -> None:
        def delete() -> None:
            self.store.delete(lora_id)
            self.trainer.evict(lora_id)

        await self._on_worker(delete)

    async def lora_exists(self, lora_id: str) -> bool:
        return await asyncio.to_thread(self.store.exists, lora_id)

    async def lora_runtime_ref(self, lora_id: str) -> LoraRuntimeRef:
        path = await asyncio.to_thread(self.store.adapter_path, lora_id)
        return LoraRuntimeRef(name=lora_id, path=str(path))

    async def response_logprobs(
        self, lora_id: str | None, messages: list[dict[str, Any]], response: str
    ) -> list[float]:
        return await self._on_worker(lambda: self.trainer.response_logprobs(lora_id, messages, response))

    async def health(self) -> dict[str, Any]:
        return {"engine": self.kind, "lora_root": str(self.store.root), **self.trainer.health()}

    async def close(self) -> None:
        self._worker.shutdown(wait=True, cancel_futures=True)
        if self._remote_teacher is not None:
            self._remote_teacher.close()
