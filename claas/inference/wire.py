"""Request models of the OpenAI-compatible routes, and how each becomes the payload sent to the inference server.

The models validate only what the proxy reads or what is cheap to check; every other field (OpenAI's, vLLM's
extras such as `top_k`, `chat_template_kwargs`, `stop_token_ids`) is kept and passed through unchanged. Fields that
are in neither OpenAI's nor vLLM's usual set are logged at debug level, so a typo is visible without breaking clients.

CLaaS extension: `strip_thinking: true` in the body (or the header `X-Claas-Strip-Thinking: 1`) removes
`<think>...</think>` blocks from the reply; the completion cache always keeps the full text and exact tokens.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from claas.core.chat import check_messages

logger = logging.getLogger(__name__)

_KNOWN_FIELDS = frozenset(
    # OpenAI chat + legacy completions
    "model messages prompt suffix frequency_penalty logit_bias logprobs top_logprobs max_tokens max_completion_tokens "
    "n presence_penalty response_format seed stop stream stream_options temperature top_p tools tool_choice "
    "parallel_tool_calls user echo best_of reasoning_effort include_reasoning service_tier metadata store modalities "
    "audio prediction web_search_options "
    # vLLM sampling params and extras
    "use_beam_search top_k min_p repetition_penalty length_penalty stop_token_ids include_stop_str_in_output "
    "ignore_eos min_tokens skip_special_tokens spaces_between_special_tokens truncate_prompt_tokens prompt_logprobs "
    "allowed_token_ids bad_words add_generation_prompt continue_final_message add_special_tokens documents "
    "chat_template chat_template_kwargs mm_processor_kwargs structured_outputs guided_json guided_regex guided_choice "
    "guided_grammar priority request_id logits_processors return_tokens_as_token_ids return_token_ids cache_salt "
    "kv_transfer_params vllm_xargs".split()
)


@dataclass(frozen=True)
class ReplyOptions:
    """What the client asked to see; the proxy always asks the server for more (logprobs, token ids)."""

    logprobs: bool
    token_ids: bool
    strip_thinking: bool


class _OpenAIRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    stream: bool | None = False
    stream_options: dict[str, Any] | None = None
    n: int | None = Field(None, ge=1, le=128)
    max_tokens: int | None = Field(None, ge=0)
    temperature: float | None = Field(None, ge=0)
    return_token_ids: bool | None = None
    strip_thinking: bool | None = Field(None, description="CLaaS extension: remove <think> blocks from the reply.")

    def _base_payload(self) -> dict[str, Any]:
        payload = self.model_dump(exclude_unset=True, exclude={"strip_thinking"})
        extras = self.model_extra or {}
        if extras and logger.isEnabledFor(logging.DEBUG):
            unknown = sorted(set(extras) - _KNOWN_FIELDS)
            if unknown:
                logger.debug("passing through non-standard request fields: %s", ", ".join(unknown))
        payload["return_token_ids"] = True
        return payload

    @property
    def choices_per_prompt(self) -> int:
        return self.n or 1


class ChatCompletionRequest(_OpenAIRequest):
    messages: list[dict[str, Any]] = Field(min_length=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)

    @field_validator("messages")
    @classmethod
    def _messages_shape(cls, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        check_messages(messages)
        return messages

    def reply_options(self, *, strip_thinking: bool = False) -> ReplyOptions:
        return ReplyOptions(
            logprobs=bool(self.logprobs),
            token_ids=bool(self.return_token_ids),
            strip_thinking=bool(self.strip_thinking) or strip_thinking,
        )

    def to_upstream_payload(self) -> dict[str, Any]:
        """The client's request plus what the cache needs: the sampled tokens' ids and logprobs."""
        payload = self._base_payload()
        payload["logprobs"] = True
        return payload


class CompletionRequest(_OpenAIRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool | None = False

    def reply_options(self, *, strip_thinking: bool = False) -> ReplyOptions:
        return ReplyOptions(
            logprobs=self.logprobs is not None,
            token_ids=bool(self.return_token_ids),
            strip_thinking=bool(self.strip_thinking) or strip_thinking,
        )

    def to_upstream_payload(self) -> dict[str, Any]:
        payload = self._base_payload()
        if self.logprobs is None:
            payload["logprobs"] = 1  # the sampled token's logprob (plus a top-1 alternative we strip)
        return payload

    def prompt_text(self, choice_index: int) -> str:
        """The prompt that produced choice `choice_index` (batched prompts give n choices each); "" for token ids."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return prompt
        if prompt and isinstance(prompt[0], str):
            index = min(choice_index // self.choices_per_prompt, len(prompt) - 1)
            text = prompt[index]
            return text if isinstance(text, str) else ""
        return ""


class ScoreRequest(BaseModel):
    """`POST /v1/score`: per-token logprobs of `completion` as the answer to `messages` under `model`."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1)
    messages: list[dict[str, Any]] = Field(min_length=1)
    completion: str = Field(min_length=1)

    @field_validator("messages")
    @classmethod
    def _messages_shape(cls, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        check_messages(messages)
        return messages
