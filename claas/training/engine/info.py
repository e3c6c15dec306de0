"""`lora_info`: a store's LoraMetadata as the API's LoraInfo (torch-free, shared by the local and modal engines)."""

from __future__ import annotations

from claas.core.types import LoraInfo
from claas.training.storage import LoraMetadata


def lora_info(metadata: LoraMetadata, aliases: list[str] | None = None) -> LoraInfo:
    return LoraInfo(
        lora_id=metadata.lora_id,
        base_model=metadata.base_model,
        rank=metadata.rank,
        alpha=metadata.alpha,
        step=metadata.step,
        created_at=metadata.created_at,
        updated_at=metadata.updated_at,
        aliases=aliases or [],
        version_of=metadata.version_of,
    )
