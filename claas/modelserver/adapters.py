"""PEFT multi-adapter state of one resident model: attach, detach, and pick the adapter for one forward pass.

All methods must run on the engine's single worker thread (they mutate modules that generation reads). Adapters are
attached under *internal* names (`lora1`, `lora2`, ...) because PEFT adapter names become module-dict keys and
CLaaS adapter names such as `user/name` contain characters those keys forbid; the engine maps public names to them.

The first attach wraps the model with `PeftModel.from_pretrained`; later ones use `load_adapter`. Detaching the last
adapter calls `unload()`, which restores the plain model (no LoRA layers left), so base-only serving runs at full
speed again. Base requests while adapters are attached run with the LoRA layers disabled, which gives the base
logits exactly; `use` remembers the selection, so consecutive forwards with the same adapter (every decode step)
touch no module.

`validate` checks an adapter directory against the base model's module shapes without touching the model (the shapes
are recorded at start, so it works at sleep level 2 too, when there is no model). `copy_inplace` is vLLM's
`load_inplace` done cheaply: when the new files have the resident adapter's exact config and tensor shapes, their
weights are copied straight into the resident LoRA tensors (no PEFT state-dict load, no module rebuild).
It runs on the worker thread while no request is decoding, so no forward pass ever sees a half-copied adapter.

Not here: the public name registry, HTTP errors for unknown names, sleep/wake (engine.py).
"""

from __future__ import annotations

import json
import logging
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

_LORA_PARTS = (".lora_A.", ".lora_B.", ".lora_embedding_A", ".lora_embedding_B")
#: LoraConfig fields that decide the LoRA modules' shapes and scaling; in-place copy needs them all equal.
_STRUCTURAL_FIELDS = (
    "r",
    "lora_alpha",
    "target_modules",
    "exclude_modules",
    "use_rslora",
    "use_dora",
    "fan_in_fan_out",
    "bias",
    "lora_bias",
    "modules_to_save",
    "layers_to_transform",
    "layers_pattern",
    "rank_pattern",
    "alpha_pattern",
)

logger = logging.getLogger(__name__)


class AdapterLoadError(Exception):
    """The adapter directory could not be applied to this base model (bad config, shapes, files)."""


def looks_like_adapter_dir(path: str) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


def read_adapter_config(path: str) -> dict[str, Any]:
    """The adapter's config as a dict; unreadable or malformed → AdapterLoadError (vLLM answers 500)."""
    try:
        config = json.loads((Path(path) / "adapter_config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterLoadError(f"cannot read adapter_config.json: {type(exc).__name__}: {exc}") from exc
    if not isinstance(config, dict):
        raise AdapterLoadError("adapter_config.json is not a JSON object")
    return config


def _structure(config: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key in _STRUCTURAL_FIELDS:
        value = config.get(key)
        out[key] = sorted(value) if isinstance(value, (list, set, tuple)) else value
    return out


def _resident_name(key: str, internal: str) -> str:
    """The PeftModel parameter name of a saved adapter tensor: PEFT saves without the adapter name."""
    for part in (".lora_A.weight", ".lora_B.weight", ".lora_A.bias", ".lora_B.bias"):
        if key.endswith(part):
            stem, _, leaf = part.rpartition(".")
            return key[: -len(part)] + f"{stem}.{internal}.{leaf}"
    for part in (".lora_embedding_A", ".lora_embedding_B", ".lora_magnitude_vector"):
        if key.endswith(part):
            return f"{key}.{internal}" if part != ".lora_magnitude_vector" else f"{key}.{internal}.weight"
    return key


def _module_shapes(model: Any) -> dict[str, tuple[int, int]]:
    """(in, out) of every Linear and (num_embeddings, dim) of every Embedding of the plain model, by module name."""
    import torch

    shapes: dict[str, tuple[int, int]] = {}
    for name, module in model.named_modules():
        base = getattr(module, "base_layer", module)  # already wrapped by PEFT: the original layer
        if isinstance(base, torch.nn.Linear):
            shapes[name.replace(".base_layer", "")] = (base.in_features, base.out_features)
        elif isinstance(base, torch.nn.Embedding):
            shapes[name.replace(".base_layer", "")] = (base.num_embeddings, base.embedding_dim)
    return shapes


class AdapterSlots:
    def __init__(self, model: Any) -> None:
        self.model: Any = model  # the plain causal LM (LoRA layers injected in place once wrapped)
        self._peft: Any = None
        self._attached: set[str] = set()
        self._shapes = _module_shapes(model)  # kept through sleep level 2, for `validate`
        self._enabled: bool | None = None  # whether the LoRA layers are enabled; None = unknown (set on next use)
        self._active: str | None = None  # the adapter PEFT has active; None = unknown

    def validate(self, path: str) -> dict[str, Any]:
        """Refuse an adapter that cannot apply to this base model (config, target modules, tensor shapes), without
        loading it into the model; AdapterLoadError says why. Returns the weights it read (for `copy_inplace`)."""
        from peft.utils import load_peft_weights

        config = read_adapter_config(path)
        if config.get("peft_type", "LORA") != "LORA":
            raise AdapterLoadError(f"peft_type {config.get('peft_type')!r} is not a LoRA adapter")
        rank = config.get("r")
        if not isinstance(rank, int) or rank < 1:
            raise AdapterLoadError(f"adapter_config.json has no valid rank r (got {rank!r})")
        targets = config.get("target_modules")
        names = list(self._shapes)
        if isinstance(targets, str):
            matched = [n for n in names if re.fullmatch(targets, n)]
        elif isinstance(targets, list) and targets:
            matched = [n for n in names if any(n == t or n.endswith("." + t) for t in targets)]
        else:
            raise AdapterLoadError(f"adapter_config.json has no target_modules (got {targets!r})")
        if not matched:
            raise AdapterLoadError(f"target_modules {targets!r} match no module of the base model")
        try:
            weights = load_peft_weights(path, device="cpu")
        except Exception as exc:  # missing/corrupt safetensors or bin: report it as the load failure it is
            raise AdapterLoadError(f"cannot read the adapter weights: {type(exc).__name__}: {exc}") from exc
        uniform_rank = not config.get("rank_pattern")
        for key, tensor in weights.items():
            # A: [r, in] (embedding: [r, num_embeddings]); B: [out, r] (embedding: [dim, r]); biases are 1-D
            kind = next((k for k in _LORA_PARTS if k in key), None)
            if kind is None or tensor.dim() != 2:
                continue
            module = key.split(kind)[0].removeprefix("base_model.model.")
            shape = self._shapes.get(module)
            if shape is None:
                raise AdapterLoadError(f"weight {key} names a module the base model does not have")
            is_a = kind in (".lora_A.", ".lora_embedding_A")
            r_dim, feature = (tensor.shape[0], tensor.shape[1]) if is_a else (tensor.shape[1], tensor.shape[0])
            if feature != (shape[0] if is_a else shape[1]):
                raise AdapterLoadError(
                    f"weight {key} has shape {tuple(tensor.shape)}, which does not fit {module} of the base model"
                )
            if uniform_rank and r_dim != rank:
                raise AdapterLoadError(f"weight {key} has rank {r_dim} but adapter_config.json says r={rank}")
        return weights

    def copy_inplace(self, internal: str, path: str, weights: dict[str, Any] | None = None) -> bool:
        """Copy the weights at `path` into the attached adapter `internal`; False (nothing changed) when they do not
        fit it exactly (other config, keys or shapes), so the caller rebuilds the adapter instead.

        A direct `copy_` into the resident parameters (PEFT's `set_peft_model_state_dict` goes through the whole
        model's `load_state_dict` and took ~0.8 s here)."""
        import torch
        from peft.utils import load_peft_weights

        if internal not in self._attached or self._peft is None:
            return False
        resident_config = self._peft.peft_config[internal].to_dict()
        if _structure(read_adapter_config(path)) != _structure(resident_config):
            return False
        new = weights if weights is not None else load_peft_weights(path, device="cpu")
        params = dict(self._peft.named_parameters())
        resident = {name: param for name, param in params.items() if f".{internal}." in name or name.endswith(internal)}
        pairs = []
        for key, tensor in new.items():
            target = params.get(_resident_name(key, internal))
            if target is None or target.shape != tensor.shape:
                return False
            pairs.append((target, tensor))
        if len(pairs) != len(resident):  # the file must replace every tensor of the adapter, no more, no less
            return False
        # Hundreds of small copies: one intra-op thread. With more, each copy_ pays an OpenMP fork/join, and on a
        # busy CPU that took 0.7 s instead of 17 ms (measured). Safe to change here: all torch work is on this thread.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with torch.no_grad():  # every tensor checked above, so the copy below cannot stop half-way
                for target, tensor in pairs:
                    target.copy_(tensor)
        finally:
            torch.set_num_threads(threads)
        return True

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
            self._forget_selection()
            self._recover_after_failed_attach(internal)
            raise AdapterLoadError(f"{type(exc).__name__}: {exc}") from exc
        self._forget_selection()
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
        self._forget_selection()
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
        self._forget_selection()
        self.model = None

    def reset(self, model: Any) -> None:
        self._peft = None
        self._attached.clear()
        self._forget_selection()
        self.model = model
        self._shapes = _module_shapes(model)

    def mixed(self, internals: list[str | None]) -> Callable[..., Any]:
        """The model call for a batch whose rows use different adapters (None = the base model): PEFT's mixed-batch
        inference, which runs the base layers once for all rows and adds each row's own LoRA delta."""
        from functools import partial

        assert self._peft is not None, "a mixed batch has at least one adapter, so PEFT wraps the model"
        self._enable(True)  # disabled layers would ignore adapter_names and give every row the base model
        return partial(self._peft, adapter_names=[name or "__base__" for name in internals])

    def use(self, internal: str | None) -> Any:
        """Select `internal` (or the bare base model for None) for the next forward passes; returns the model.

        PEFT's `set_adapter` and `disable_adapter()` walk every module (10 and 55 ms here, measured), too slow for
        every decode step, so the selection is remembered and only a change touches the layers."""
        if self._peft is None:
            return self.model
        if internal is None:
            self._enable(False)
            return self.model
        self._enable(True)
        if self._active != internal:
            self._peft.set_adapter(internal)
            self._active = internal
        return self.model

    def _enable(self, enabled: bool) -> None:
        if self._enabled is enabled:
            return
        if enabled:
            self._peft.base_model.enable_adapter_layers()
        else:
            self._peft.base_model.disable_adapter_layers()
        self._enabled = enabled

    def _forget_selection(self) -> None:
        """After PEFT changed adapters (attach, detach, reset) the layers' selection is unknown: set it on next use."""
        self._enabled = None
        self._active = None
