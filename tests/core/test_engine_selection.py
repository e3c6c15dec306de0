"""CLAAS_TRAINING_ENGINE / CLAAS_DISTILL_EXECUTION_MODE pick the engine; remote engines fail clearly when unset."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from claas.core.config import Settings
from claas.training.engine import get_training_engine
from claas.training.engine.remote_errors import EngineConfigError


def _settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, **env: str) -> Settings:
    for name in ("CLAAS_TRAINING_ENGINE", "CLAAS_DISTILL_EXECUTION_MODE", "CLAAS_TINKER_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return Settings(_env_file=None, lora_root=tmp_path / "loras")  # type: ignore[call-arg]


@pytest.mark.parametrize("mode", ["local", "modal", "tinker"])
def test_the_original_name_is_an_alias(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, mode: str) -> None:
    assert _settings(monkeypatch, tmp_path, CLAAS_DISTILL_EXECUTION_MODE=mode).training_engine == mode


def test_both_names_agreeing_is_fine(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    settings = _settings(monkeypatch, tmp_path, CLAAS_TRAINING_ENGINE="modal", CLAAS_DISTILL_EXECUTION_MODE="modal")
    assert settings.training_engine == "modal"


def test_both_names_differing_is_an_error_naming_both(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with pytest.raises(ValidationError) as caught:
        _settings(monkeypatch, tmp_path, CLAAS_TRAINING_ENGINE="local", CLAAS_DISTILL_EXECUTION_MODE="tinker")
    message = str(caught.value)
    assert "CLAAS_TRAINING_ENGINE=local" in message and "CLAAS_DISTILL_EXECUTION_MODE=tinker" in message


def test_tinker_without_a_key_is_a_startup_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    settings = _settings(monkeypatch, tmp_path, CLAAS_DISTILL_EXECUTION_MODE="tinker")
    with pytest.raises(EngineConfigError, match="CLAAS_TINKER_API_KEY"):
        get_training_engine(settings.training_engine, settings)


def test_tinker_with_a_key_builds_lazily_without_network(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    settings = _settings(monkeypatch, tmp_path, CLAAS_TRAINING_ENGINE="tinker", CLAAS_TINKER_API_KEY="tml-test")
    engine = get_training_engine(settings.training_engine, settings)
    assert engine.kind == "tinker" and not engine.shares_inference_device


def test_modal_builds_lazily_without_network(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    settings = _settings(monkeypatch, tmp_path, CLAAS_TRAINING_ENGINE="modal")
    engine = get_training_engine(settings.training_engine, settings)
    assert engine.kind == "modal" and not engine.shares_inference_device
