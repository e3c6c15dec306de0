"""VolumeLoraStore: the LoraStore on a Modal Volume mount, same layout and atomicity, plus the Volume's contract.

A Modal Volume gives each container its own view: writes become visible elsewhere only after `commit()`, and other
containers' commits become visible here only after `reload()`. So every public read reloads first and every write
commits after itself; the atomic snapshot + link swap of `LoraStore` happens inside the mount as on a local disk.
`volume` is anything with `reload()` and `commit()` (a `modal.Volume`, or a local stand-in in tests).

Not here: the Modal calls themselves (claas.training.engine.modal), the snapshot layout (claas.training.storage).
"""

from __future__ import annotations

import builtins
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from claas.training.storage import LoraEntry, LoraMetadata, LoraStore


class VolumeLike(Protocol):
    def reload(self) -> Any: ...

    def commit(self) -> Any: ...


class VolumeLoraStore(LoraStore):
    def __init__(self, root: Path, volume: VolumeLike, **kwargs: Any) -> None:
        super().__init__(root, **kwargs)
        self.volume = volume
        self._calls = threading.local()  # reads nested in another public call (list -> read_metadata) skip reload

    def refresh(self) -> None:
        """See other containers' commits (what every read does first)."""
        self.volume.reload()

    def _outer(self, fn: Callable[[], Any]) -> Any:
        depth = getattr(self._calls, "depth", 0)
        if depth == 0:
            self.refresh()
        self._calls.depth = depth + 1
        try:
            return fn()
        finally:
            self._calls.depth = depth

    # ------------------------------------------------------------------ reads: reload first
    def adapter_path(self, lora_id: str) -> Path:
        return self._outer(lambda: super(VolumeLoraStore, self).adapter_path(lora_id))

    def exists(self, lora_id: str) -> bool:
        return self._outer(lambda: super(VolumeLoraStore, self).exists(lora_id))

    def read_metadata(self, lora_id: str) -> LoraMetadata:
        return self._outer(lambda: super(VolumeLoraStore, self).read_metadata(lora_id))

    def list(self, prefix: str = "") -> builtins.list[LoraEntry]:
        return self._outer(lambda: super(VolumeLoraStore, self).list(prefix))

    def export_zip(self, lora_id: str) -> bytes:
        return self._outer(lambda: super(VolumeLoraStore, self).export_zip(lora_id))

    # ------------------------------------------------------------------ writes: commit after
    def create(self, lora_id: str, write: Callable[[Path], None], metadata: LoraMetadata) -> Path:
        result = self._outer(lambda: super(VolumeLoraStore, self).create(lora_id, write, metadata))
        self.volume.commit()
        return result

    def save(self, lora_id: str, write: Callable[[Path], None], metadata: LoraMetadata) -> Path:
        result = self._outer(lambda: super(VolumeLoraStore, self).save(lora_id, write, metadata))
        self.volume.commit()
        return result

    def save_version(self, lora_id: str, write: Callable[[Path], None], metadata: LoraMetadata) -> str:
        result = self._outer(lambda: super(VolumeLoraStore, self).save_version(lora_id, write, metadata))
        self.volume.commit()
        return result

    def delete(self, lora_id: str) -> None:
        self._outer(lambda: super(VolumeLoraStore, self).delete(lora_id))
        self.volume.commit()
