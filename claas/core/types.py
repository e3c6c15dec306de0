"""Pydantic models shared by the API, the feedback transaction, the engines and the CLI.

Scope: CLaaS's own request/response shapes (feedback, distill, LoRA lifecycle). The OpenAI-compatible inference
shapes are passed through to the inference server and are not modelled here.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from claas.core.chat import check_messages

#: Shared field shapes, so the single and the batch form of feedback refuse the same input the same way (422).
LoraIdField = Annotated[str, Field(min_length=1, max_length=128)]
NonEmptyText = Annotated[str, Field(min_length=1)]
Logprob = Annotated[float, Field(allow_inf_nan=False)]


def _check_prompt(prompt: str | list[dict[str, Any]] | None) -> str | list[dict[str, Any]] | None:
    if isinstance(prompt, str) and not prompt.strip():
        raise ValueError("prompt must not be empty")
    if isinstance(prompt, list):
        if not prompt:
            raise ValueError("prompt messages must not be empty")
        check_messages(prompt)
    return prompt


LossMode = Literal["student_topk", "teacher_topk", "full"]
FeedbackPlacement = Literal["user", "system"]


class TrainingConfig(BaseModel):
    """Per-request SDPO hyperparameters (defaults follow the original CLaaS / SDPO paper settings)."""

    model_config = ConfigDict(extra="forbid")

    learning_rate: float = Field(3e-5, gt=0, le=1.0)
    alpha: float = Field(0.5, ge=0.0, le=1.0, description="Generalized JSD weight (0/1 = the two KL directions).")
    is_clip: float = Field(5.0, gt=0, description="Clip for the token-level importance weight.")
    max_grad_norm: float = Field(1.0, gt=0)
    kl_reg_weight: float = Field(0.0, ge=0, description="Weight of the k3 KL to the frozen base.")
    teacher_top_k: int = Field(100, ge=1, le=1000, description="K of the top-K + tail approximation.")
    loss_mode: LossMode = "student_topk"
    teacher_mode: Literal["self", "remote"] = "self"
    weight_decay: float = Field(0.01, ge=0)
    steps: int = Field(1, ge=1, le=16, description="Optimizer steps on this batch (1 = strictly on-policy).")
    feedback_placement: FeedbackPlacement = Field(
        "user",
        description="Where the teacher sees the feedback: a hindsight block after the last user turn (`user`, as the "
        "reference) or a standing instruction in the system prompt (`system`).",
    )
    teacher_demonstration: bool = Field(
        False,
        description="Also train on the teacher's own answer (the frozen base shown the feedback answers the prompt, "
        "greedy), besides the served answer: carries what the feedback asks for into positions the student's answer "
        "never reached. Needs teacher_mode=self.",
    )

    @model_validator(mode="after")
    def _demonstration_needs_self_teacher(self) -> TrainingConfig:
        if self.teacher_demonstration and self.teacher_mode != "self":
            raise ValueError("teacher_demonstration needs teacher_mode 'self' (the local frozen base answers)")
        return self


class OrchestrationConfig(BaseModel):
    """How the feedback transaction treats the inference server around a step."""

    model_config = ConfigDict(extra="forbid")

    sleep_before: bool = True
    wake_after: bool = True
    wake_on_failure: bool = True
    sleep_level: Literal[1, 2] = 1


class FeedbackItem(BaseModel):
    """One piece of feedback on one served (or user-supplied) answer."""

    model_config = ConfigDict(extra="forbid")

    lora_id: LoraIdField
    prompt: str | list[dict[str, Any]] = Field(
        description="The user prompt, or the full chat messages that preceded the response."
    )
    response: NonEmptyText
    feedback: NonEmptyText
    rollout_logprobs: list[Logprob] | None = None
    completion_id: str | None = Field(None, description="Id of the served completion, when the caller has it.")
    system_prompt: str | None = None
    training: TrainingConfig | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt_not_empty(cls, prompt: Any) -> Any:
        return _check_prompt(prompt)


class FeedbackRequest(BaseModel):
    """Either the single form (the item's fields at top level) or the batch form (`requests`)."""

    model_config = ConfigDict(extra="forbid")

    lora_id: LoraIdField | None = None
    prompt: str | list[dict[str, Any]] | None = None
    response: NonEmptyText | None = None
    feedback: NonEmptyText | None = None
    rollout_logprobs: list[Logprob] | None = None
    completion_id: str | None = None
    system_prompt: str | None = None
    training: TrainingConfig | None = None
    requests: list[FeedbackItem] | None = Field(None, min_length=1, max_length=64)
    orchestration: OrchestrationConfig = Field(default_factory=OrchestrationConfig)

    @field_validator("prompt")
    @classmethod
    def _prompt_not_empty(cls, prompt: Any) -> Any:
        return _check_prompt(prompt)

    def items(self) -> list[FeedbackItem]:
        if self.requests is not None:
            return list(self.requests)
        return [
            FeedbackItem.model_validate(
                {
                    "lora_id": self.lora_id,
                    "prompt": self.prompt,
                    "response": self.response,
                    "feedback": self.feedback,
                    "rollout_logprobs": self.rollout_logprobs,
                    "completion_id": self.completion_id,
                    "system_prompt": self.system_prompt,
                    "training": self.training,
                }
            )
        ]

    @model_validator(mode="after")
    def _one_form(self) -> FeedbackRequest:
        single = [self.lora_id, self.prompt, self.response, self.feedback]
        if self.requests is not None:
            if any(v is not None for v in single):
                raise ValueError("send either the single form (lora_id, prompt, ...) or `requests`, not both")
            ids = {item.lora_id for item in self.requests}
            if len(ids) != 1:
                raise ValueError(f"a batch must target one lora_id, got {sorted(ids)}")
            return self
        missing = [n for n, v in zip(["lora_id", "prompt", "response", "feedback"], single) if v is None]
        if missing:
            raise ValueError(f"missing field(s): {', '.join(missing)} (or send the batch form `requests`)")
        return self


class TrainingExample(BaseModel):
    """One feedback item resolved for training. Token ids are exact when the completion came from the cache."""

    messages: list[dict[str, Any]] = Field(description="Chat messages before the response (system + user ...).")
    response_text: str
    feedback: str
    prompt_token_ids: list[int] | None = None
    response_token_ids: list[int] | None = None
    rollout_logprobs: list[float] | None = None
    source: Literal["cache", "tokenized"] = "tokenized"
    completion_id: str | None = Field(None, description="The cached completion trained on (source=cache).")


class DistillBatch(BaseModel):
    lora_id: str
    examples: list[TrainingExample] = Field(min_length=1)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    save_mode: Literal["in_place", "version"] = "in_place"


class DistillResult(BaseModel):
    lora_id: str = Field(description="The adapter holding the update (a new versioned id for save_mode=version).")
    step: int
    metrics: dict[str, float]
    timing_ms: dict[str, float]


class LoraInitRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lora_id: str = Field(min_length=1, max_length=128)
    base_model: str | None = None
    lora_r: int | None = Field(None, ge=1, le=512)
    lora_alpha: int | None = Field(None, ge=1)
    target_modules: list[str] | None = None


class LoraInfo(BaseModel):
    lora_id: str
    base_model: str
    rank: int
    alpha: int
    step: int
    created_at: str
    updated_at: str
    aliases: list[str] = Field(default_factory=list)
    version_of: str | None = None


class LoraRuntimeRef(BaseModel):
    """How the inference server should load an adapter: its name and a path the server can read."""

    name: str
    path: str


class DistillRequest(FeedbackItem):
    """`POST /v1/distill`: one step written to a new versioned checkpoint."""
