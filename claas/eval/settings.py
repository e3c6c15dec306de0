"""Typed eval configuration: Hydra composes `configs/base.yaml` with the command-line overrides, each name in
`preferences` is read from `configs/preference/<name>.yaml` (or a path to a YAML file), and pydantic validates the
result, so a typo in an override fails before anything is sent to the service."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf
from pydantic import BaseModel, ConfigDict, Field

CONFIG_DIR = Path(__file__).parent / "configs"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GenerationConfig(_Strict):
    max_tokens: int = Field(64, ge=1)
    temperature: float = Field(0.7, ge=0.0)


class MeasureConfig(_Strict):
    every: int = Field(1, ge=1)
    slow_every: int = Field(5, ge=1)
    max_tokens: int = Field(64, ge=1)
    sampled_temperature: float = Field(0.7, ge=0.0)
    sampled_per_probe: int = Field(1, ge=1)
    probe_limit: int | None = Field(None, ge=1, description="Use only the first N probe prompts (quick runs).")
    concurrency: int = Field(8, ge=1, description="Probe requests in flight at once (the server batches them).")
    metrics: list[str] = Field(default_factory=lambda: ["margin", "compliance", "capability", "collapse"])


class Fact(_Strict):
    prompt: str
    answer: str  # regex, searched case-insensitively


class CodingTask(_Strict):
    prompt: str
    tests: str
    timeout_s: float = Field(5.0, gt=0)


class InstructionTask(_Strict):
    prompt: str
    answer: str
    max_words: int = Field(3, ge=1)


class CapabilityConfig(_Strict):
    facts: list[Fact]
    coding: CodingTask
    instruction: InstructionTask
    limit: int | None = Field(None, ge=1, description="Use only the first N facts (quick runs).")


class CollapseConfig(_Strict):
    sample_prompt: str
    samples: int = Field(3, ge=2)
    reference_prompt: str
    reference_text: str


class LogprobPair(_Strict):
    prompt: str
    preferred: str
    dispreferred: str


class Preference(_Strict):
    name: str
    feedback: str
    verifier: dict[str, Any] = Field(description="Hydra `_target_` + arguments of a callable (Answer) -> bool.")
    logprob_pairs: list[LogprobPair] = Field(min_length=1)
    training_prompts: list[str] = Field(min_length=1)
    probe_prompts: list[str] = Field(min_length=1, description="Held out: never trained on.")

    def build_verifier(self) -> Any:
        return instantiate(self.verifier)

    def probes(self, limit: int | None) -> list[str]:
        return self.probe_prompts[:limit] if limit else list(self.probe_prompts)

    def check_held_out(self) -> None:
        overlap = set(self.training_prompts) & set(self.probe_prompts)
        if overlap:
            raise ValueError(f"preference {self.name!r}: probe prompts are also training prompts: {sorted(overlap)}")


class EvalConfig(_Strict):
    claas_url: str
    openclaw_url: str | None = None
    openclaw_model: str | None = None
    base_model: str
    preferences: list[str] = Field(min_length=1)
    num_steps: int = Field(ge=0)
    output_dir: Path
    run_id: str | None = None
    lora_prefix: str = "eval"
    seed: int = 0
    feedback_batch_size: int = Field(1, ge=1, le=64)
    training: dict[str, Any] = Field(default_factory=dict)
    request_timeout_s: float = Field(600.0, gt=0)
    generation: GenerationConfig
    measure: MeasureConfig
    capability: CapabilityConfig
    collapse: CollapseConfig


def compose_config(overrides: list[str]) -> EvalConfig:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="base", overrides=overrides)
    data = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(data, dict)
    data.pop("hydra", None)
    return EvalConfig.model_validate(data)


def load_preference(name: str) -> Preference:
    """A preference by name (`configs/preference/<name>.yaml`) or by path to a YAML file."""
    path = Path(name) if name.endswith((".yaml", ".yml")) else CONFIG_DIR / "preference" / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (CONFIG_DIR / "preference").glob("*.yaml"))
        raise ValueError(f"unknown preference {name!r}: use one of {known} or a path to a YAML file")
    data = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    preference = Preference.model_validate(data)
    preference.check_held_out()
    return preference
