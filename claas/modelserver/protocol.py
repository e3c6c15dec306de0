"""Request wire models of the vLLM HTTP subset the model server implements.

Field names, defaults and types follow vLLM's `ChatCompletionRequest`, `CompletionRequest`, `TokenizeRequest`,
`DetokenizeRequest` and the LoRA load/unload requests. Like vLLM, unknown fields are accepted and logged (clients that
send extras keep working). Pydantic checks only types here; range checks with vLLM's messages live in
`sampling.build_sampling_params`, so both paths answer 400 with the field named.

Responses are plain dicts built in `serving.py` (one place per shape), not models here.

Not here: generation, tokenization, HTTP routes.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

logger = logging.getLogger(__name__)

StopParam = str | list[str] | None


class OpenAIBaseModel(BaseModel):
    """Accept unknown fields (OpenAI clients send many) but log them, as vLLM does."""

    model_config = ConfigDict(extra="allow")

    @model_validator(mode="after")
    def _log_extra_fields(self) -> "OpenAIBaseModel":
        if self.model_extra:
            logger.warning("The following fields were present in the request but ignored: %s", set(self.model_extra))
        return self


class StreamOptions(OpenAIBaseModel):
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False


class FunctionDefinition(OpenAIBaseModel):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None


class ChatCompletionToolsParam(OpenAIBaseModel):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class ChatMessageParam(OpenAIBaseModel):
    """One message; `content` is a string, a list of `{"type": "text", "text"}` parts, or null."""

    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class _SamplingFields(OpenAIBaseModel):
    """Sampling fields shared by chat and completions (vLLM's `*-sampling-params` block)."""

    model: str | None = None
    n: int | None = 1
    seed: int | None = None
    stop: StopParam = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    min_tokens: int = 0
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    truncate_prompt_tokens: int | None = None
    prompt_logprobs: int | None = None
    return_token_ids: bool | None = None
    use_beam_search: bool = False
    response_format: dict[str, Any] | None = None
    user: str | None = None
    request_id: str | None = None
    priority: int = 0


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessageParam]
    logprobs: bool | None = False
    top_logprobs: int | None = 0
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    tools: list[ChatCompletionToolsParam] | None = None
    tool_choice: str | dict[str, Any] | None = "none"
    parallel_tool_calls: bool | None = True
    echo: bool = False
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    documents: list[dict[str, str]] | None = None
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    @property
    def requested_max_tokens(self) -> tuple[int | None, str]:
        """The output budget and the name of the field it came from (vLLM prefers max_completion_tokens)."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens, "max_completion_tokens"
        return self.max_tokens, "max_tokens"


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]] | None = None
    echo: bool | None = False
    logprobs: int | None = None
    max_tokens: int | None = 16
    suffix: str | None = None
    add_special_tokens: bool = True

    @model_validator(mode="before")
    @classmethod
    def _null_max_tokens_means_default(cls, data: Any) -> Any:
        # vLLM's normalize_null_max_tokens: an explicit null is the default 16.
        if isinstance(data, dict) and data.get("max_tokens", 16) is None:
            data = {**data, "max_tokens": 16}
        return data


class TokenizeRequest(OpenAIBaseModel):
    """Either `prompt` (text) or `messages` (rendered with the chat template), like vLLM's two tokenize requests."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessageParam] | None = None
    add_special_tokens: bool | None = None  # vLLM default: True for prompt, False for messages
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    return_token_strs: bool | None = False
    tools: list[ChatCompletionToolsParam] | None = None
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _exactly_one_input(self) -> "TokenizeRequest":
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("exactly one of `prompt` or `messages` must be given")
        return self


class DetokenizeRequest(OpenAIBaseModel):
    model: str | None = None
    tokens: list[int]


class LoadLoRAAdapterRequest(OpenAIBaseModel):
    lora_name: str
    lora_path: str
    load_inplace: bool = False


class UnloadLoRAAdapterRequest(OpenAIBaseModel):
    lora_name: str
    lora_int_id: int | None = Field(default=None)
