"""Service configuration: one pydantic-settings class read from `CLAAS_*` env vars and `.env`.

Scope: values that differ between deployments. Per-request knobs (learning rate, alpha, ...) live in the request
models in `claas.core.types`, not here. Eval experiments are configured with Hydra, not here.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def _xdg(var: str, fallback: str) -> Path:
    return Path(os.environ.get(var) or Path.home() / fallback) / "claas"


class Settings(BaseSettings):
    """Every CLaaS setting; the env var is `CLAAS_` + the field name in upper case."""

    model_config = SettingsConfigDict(env_prefix="CLAAS_", env_file=".env", extra="ignore")

    # Models
    base_model: str = Field("smollm2-135m", description="Base model: a registry name, a local directory or an HF id.")
    model_cache: Path = Field(
        default_factory=lambda: _xdg("XDG_CACHE_HOME", ".cache") / "models",
        description="Where converted models (GGUF -> safetensors) are cached.",
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Torch device; auto = CUDA when present.")

    # Inference server (vLLM or `claas model-server`)
    vllm_base_url: str = Field("http://127.0.0.1:8000", description="Base URL of the vLLM-compatible server.")
    vllm_api_key: SecretStr | None = Field(
        None, description="Bearer key sent to the inference server, if it needs one."
    )
    vllm_timeout_s: float = Field(300.0, gt=0, description="Timeout for one request to the inference server.")
    vllm_inplace_reload: bool = Field(
        True,
        description="Swap a trained adapter with vLLM's load_inplace (no unload window; milliseconds on the model "
        "server). Set false for a vLLM with prefix caching that lacks the fix for vllm#42125 (stale cached blocks "
        "after a same-name reload): the reload then unloads and loads under a fresh adapter id.",
    )

    # Training
    training_engine: Literal["local", "modal", "tinker"] = Field("local", description="Which engine runs SDPO steps.")
    lora_root: Path = Field(
        default_factory=lambda: _xdg("XDG_DATA_HOME", ".local/share") / "loras",
        description="Root directory of the adapter store (local engine).",
    )
    hot_adapters: int = Field(8, ge=1, description="Adapters (weights + optimizer state) kept resident in memory.")
    lora_rank: int = Field(32, ge=1, description="Default LoRA rank for new adapters.")
    lora_alpha: int = Field(64, ge=1, description="Default LoRA alpha for new adapters.")
    remote_teacher_url: str | None = Field(None, description="vLLM-compatible server used by teacher_mode=remote.")
    remote_teacher_model: str | None = Field(None, description="Model name on the remote teacher server.")

    # Gateway
    feedback_lock_timeout_s: float = Field(120.0, gt=0, description="Wait for a LoRA's lock before answering 409.")
    feedback_log_dir: Path = Field(
        default_factory=lambda: _xdg("XDG_DATA_HOME", ".local/share") / "feedback",
        description="One JSON record per feedback request is written here.",
    )
    eval_dir: Path = Field(
        Path("data/evals"), description="Eval runs (`claas eval` output), browsed by the /v1/eval dashboard."
    )
    completion_cache_size: int = Field(4096, ge=1, description="Completions kept for feedback lookup.")
    completion_cache_max_bytes: int = Field(
        256 * 1024 * 1024, ge=1, description="Bytes (estimated) the completion cache may hold; LRU beyond."
    )
    completion_cache_ttl_s: float = Field(3600.0, gt=0, description="Seconds a cached completion stays usable.")
    context_overflow: Literal["error", "trim"] = Field(
        "error",
        description="A chat prompt longer than the model's context: error = the server's 400 naming the lengths; "
        "trim = drop the oldest turns, then shorten the system prompt, with a visible marker.",
    )
    max_request_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="Larger request bodies get 413.")
    sleep_during_training: Literal["auto", "always", "never"] = Field(
        "auto",
        description="Put the inference server to sleep during a step: auto = when the trainer shares its "
        "accelerator (not on CPU), always, or never.",
    )
    sleep_wait_timeout_s: float = Field(
        120.0, gt=0, description="How long an inference request waits for a server asleep for a step before 503."
    )
    log_format: Literal["json", "text"] = Field(
        "json", description="`claas api` log lines: one JSON object per line, or text; both carry the request id."
    )
    max_training_tokens: int = Field(
        4096,
        ge=16,
        description="Longest feedback example trained on (prompt + feedback + response tokens, also capped by the "
        "model's context); longer ones get 413 before the server is put to sleep.",
    )
    api_keys: SecretStr | None = Field(
        None, description="Comma-separated bearer keys, `key` (admin) or `key:prefix`."
    )

    # Remote engines
    tinker_api_key: SecretStr | None = Field(None, description="Tinker API key (starts with `tml-`).")
    tinker_base_url: str | None = Field(None, description="Tinker service URL (SDK default when unset).")
    distill_execution_mode: Literal["local", "modal", "tinker"] | None = Field(
        None, description="Alias of CLAAS_TRAINING_ENGINE (the original CLaaS's name); both set and differing fails."
    )
    tinker_base_model: str = Field("Qwen/Qwen3-30B-A3B", description="Tinker model name the tinker engine trains.")
    modal_app_name: str = Field("claas", description="Deployed Modal app that hosts the DistillWorker.")
    modal_gpu: str = Field("L40S", description="GPU of the Modal DistillWorker (read by `modal deploy`).")
    modal_volume_name: str = Field("claas-loras", description="Modal Volume holding the adapter store.")
    modal_timeout_s: float = Field(600.0, gt=0, description="Longest a Modal distill call may take before 503.")

    @field_validator("vllm_base_url", "remote_teacher_url")
    @classmethod
    def _strip_slash(cls, value: str | None) -> str | None:
        return value.rstrip("/") if value else value

    @field_validator("tinker_api_key")
    @classmethod
    def _tinker_key_shape(cls, value: SecretStr | None) -> SecretStr | None:
        if value and not value.get_secret_value().startswith("tml-"):
            raise ValueError("CLAAS_TINKER_API_KEY must start with 'tml-'")
        return value

    @model_validator(mode="after")
    def _engine_alias(self) -> Settings:
        alias = self.distill_execution_mode
        if alias is None:
            return self
        if "training_engine" in self.model_fields_set and self.training_engine != alias:
            raise ValueError(
                f"CLAAS_TRAINING_ENGINE={self.training_engine} and CLAAS_DISTILL_EXECUTION_MODE={alias} disagree; "
                "set only one of them (CLAAS_TRAINING_ENGINE is the current name)"
            )
        self.training_engine = alias
        return self


def secret(value: SecretStr | None) -> str | None:
    """The clear text of a key setting, for the one place that sends it (a header, an SDK client)."""
    return value.get_secret_value() if value is not None else None


@lru_cache
def get_settings() -> Settings:
    return Settings()


def settings_table() -> list[tuple[str, str, str]]:
    """(env var, current value, description) for every setting; used by `claas config`. Keys (`SecretStr`) show
    as `**********`, never in clear."""
    current = get_settings()
    rows = []
    for name, field in Settings.model_fields.items():
        rows.append((f"CLAAS_{name.upper()}", str(getattr(current, name)), field.description or ""))
    return rows
