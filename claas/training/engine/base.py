"""The TrainingEngine interface: what the gateway needs from a place that runs SDPO steps.

Implementations (local, modal, tinker) share pure parts (loss, teacher prompts, storage), not behaviour: this
class holds no logic.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any

from claas.core.types import DistillBatch, DistillResult, LoraInfo, LoraInitRequest, LoraRuntimeRef

if TYPE_CHECKING:
    from claas.inference.base import InferenceBackend


class TrainingEngine(ABC):
    kind: str
    #: True when training runs on the inference server's accelerator, so the server must sleep during a step.
    shares_inference_device: bool

    @abstractmethod
    async def warmup(self) -> None:
        """Load what the first request would otherwise wait for (the base model, a remote check)."""

    @abstractmethod
    async def distill(self, batch: DistillBatch) -> DistillResult: ...

    @abstractmethod
    async def init_lora(self, request: LoraInitRequest) -> LoraInfo: ...

    @abstractmethod
    async def list_loras(self, prefix: str = "") -> list[LoraInfo]: ...

    @abstractmethod
    async def export_lora(self, lora_id: str) -> bytes: ...

    @abstractmethod
    async def delete_lora(self, lora_id: str) -> None: ...

    @abstractmethod
    async def lora_exists(self, lora_id: str) -> bool: ...

    @abstractmethod
    async def lora_runtime_ref(self, lora_id: str) -> LoraRuntimeRef: ...

    @abstractmethod
    async def health(self) -> dict[str, Any]: ...

    @abstractmethod
    async def close(self) -> None: ...

    def inference_backend(self) -> InferenceBackend | None:
        """What serves chat when it is not the vLLM-compatible server at CLAAS_VLLM_BASE_URL (tinker: its sampler)."""
        return None
