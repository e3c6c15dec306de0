"""Training engines: `get_training_engine(kind, settings)` returns the configured implementation.

Each engine module is imported lazily so that, e.g., the gateway with the modal engine never imports torch.
"""

from __future__ import annotations

from claas.core.config import Settings
from claas.training.engine.base import TrainingEngine


def get_training_engine(kind: str, settings: Settings) -> TrainingEngine:
    if kind == "local":
        from claas.training.engine.local import LocalEngine

        return LocalEngine(settings)
    if kind == "modal":
        from claas.training.engine.modal import ModalEngine

        return ModalEngine(settings)
    if kind == "tinker":
        from claas.training.engine.tinker import TinkerEngine

        return TinkerEngine(settings)
    raise ValueError(f"unknown training engine {kind!r}: expected one of local, modal, tinker")


__all__ = ["TrainingEngine", "get_training_engine"]
