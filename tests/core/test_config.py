"""Settings: env prefix, validation that names the variable."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from claas.core.config import Settings, settings_table


def test_env_prefix_and_normalisation(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLAAS_VLLM_BASE_URL", "http://10.0.0.5:9000/")
    monkeypatch.setenv("CLAAS_FEEDBACK_LOCK_TIMEOUT_S", "7.5")
    settings = Settings()
    assert settings.vllm_base_url == "http://10.0.0.5:9000"
    assert settings.feedback_lock_timeout_s == 7.5


@pytest.mark.parametrize(
    ("var", "value", "needle"),
    [
        ("CLAAS_TRAINING_ENGINE", "gpu-farm", "training_engine"),
        ("CLAAS_TINKER_API_KEY", "sk-123", "tml-"),
        ("CLAAS_FEEDBACK_LOCK_TIMEOUT_S", "-1", "feedback_lock_timeout_s"),
    ],
)
def test_bad_values_fail_at_start(monkeypatch: pytest.MonkeyPatch, var: str, value: str, needle: str) -> None:
    monkeypatch.setenv(var, value)
    with pytest.raises(ValidationError, match=needle):
        Settings()


def test_every_setting_is_documented() -> None:
    rows = settings_table()
    assert len(rows) == len(Settings.model_fields)
    for env_var, _value, description in rows:
        assert env_var.startswith("CLAAS_")
        assert description, f"{env_var} has no description"
