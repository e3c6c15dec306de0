"""PEFT multi-adapter state of one resident model: attach, detach, and pick the adapter for one forward pass.

All methods must run on the engine's single worker thread (they mutate modules that generation reads). Adapters are
attached under *internal* names (`lora1`, `lora2`, ...) because PEFT adapter names become module-dict keys and
CLaaS adapter names such as `user/name` contain characters those keys forbid; the engine maps public names to them.

The first attach wraps the model with `PeftModel.from_pretrained`; later ones use `load_adapter`. Detaching the last
adapter calls `unload()`, which restores the plain model (no LoRA layers left), so base-only serving runs at full
speed again. Base requests while adapters are attached run inside `disable_adapter()`, which gives the base logits
exactly.

Not here: the public name registry, HTTP errors for unknown names, sleep/wake (engine.py).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Generator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


class AdapterLoadError(Exception):
    """The adapter directory could not be applied to this base model (bad config, shapes, files)."""


def looks_like_adapter_dir(path: str) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


class AdapterSlots:
    def __init__(self, model: Any) -> None:
        self.model: Any = model  # the plain causal LM (LoRA layers injected in place once wrapped)
        self._peft: Any = None
        self._attached: set[str] = set()

    @property
    def lm(self) -> Any:
        """The causal LM to call; with adapters attached it is PEFT's base model carrying the injected LoRA layers."""
        return self.model

    @property
    def attached(self) -> frozenset[str]:
        return frozenset(self._attached)

    def attach(self, internal: str, path: str) -> None:
        from peft import PeftModel

        # low_cpu_mem_usage: create the LoRA weights on the meta device and fill them from the file, skipping a
        # random init that the load would overwrite anyway (halves the load time; the feedback flow reloads an
        # adapter after every step).
        try:
            if self._peft is None:
                self._peft = PeftModel.from_pretrained(
                    self.model, path, adapter_name=internal, is_trainable=False, low_cpu_mem_usage=True
                )
            else:
                self._peft.load_adapter(path, adapter_name=internal, is_trainable=False, low_cpu_mem_usage=True)
        except Exception as exc:
            self._recover_after_failed_attach(internal)
            raise AdapterLoadError(f"{type(exc).__name__}: {exc}") from exc
        self._peft.eval()
        self._attached.add(internal)

    def _recover_after_failed_attach(self, internal: str) -> None:
        # A failed load can leave a half-registered adapter behind; remove it so later requests never see it.
        if self._peft is None:
            self._strip_lora_layers()
            return
        if internal in getattr(self._peft, "peft_config", {}):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    if self._attached:
                        self._peft.delete_adapter(internal)
                    else:
                        self.model = self._peft.unload()
                        self._peft = None
            except Exception:  # cleanup after a failure: report the original error, log this one
                logger.exception("cleanup after a failed adapter load of %s failed", internal)

    def _strip_lora_layers(self) -> None:
        # PeftModel.from_pretrained injects LoRA layers before it loads weights; undo that in place if it failed.
        from peft.tuners.lora import LoraLayer

        for name, module in list(self.model.named_modules()):
            if isinstance(module, LoraLayer) and hasattr(module, "base_layer"):
                parent_name, _, child = name.rpartition(".")
                parent = self.model.get_submodule(parent_name) if parent_name else self.model
                setattr(parent, child, module.base_layer)

    def detach(self, internal: str) -> None:
        if internal not in self._attached:
            return
        self._attached.discard(internal)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PEFT warns when the active adapter is deleted; we select per request
            if self._attached:
                self._peft.delete_adapter(internal)
            else:
                self.model = self._peft.unload()
                self._peft = None

    def drop_all(self) -> None:
        """Forget every adapter and the model (sleep level 2); `reset` installs a fresh model later."""
        self._peft = None
        self._attached.clear()
        self.model = None

    def reset(self, model: Any) -> None:
        self._peft = None
        self._attached.clear()
        self.model = model

    @contextmanager
    def use(self, internal: str | None) -> Generator[Any]:
        """Select `internal` (or the bare base model for None) for the forward passes inside the block."""
        if self._peft is None:
            yield self.model
            return
        if internal is None:
            with self._peft.disable_adapter():
                yield self.model
            return
        self._peft.set_adapter(internal)
        yield self.model
