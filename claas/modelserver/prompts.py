"""Prompt preparation shared by chat, completions and /tokenize: the chat template, encoding, and input checks.

Chat messages are rendered to text with the tokenizer's chat template (tools, documents and `chat_template_kwargs`
passed through, as vLLM does) and then encoded with `add_special_tokens=False` by default, so `/tokenize` with the
same messages counts exactly the `prompt_tokens` a chat request reports. Text parts of array-valued `content` are
joined with "\n" (vLLM's "string" content format).

Also here: the model-name check (base, loaded adapter, or 404), out-of-vocabulary ids, and the context-length check
with vLLM's messages.

Not here: sampling and response shapes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from claas.modelserver.errors import BadRequest, model_not_found

if TYPE_CHECKING:
    from claas.modelserver.engine import Engine
    from claas.modelserver.protocol import ChatCompletionToolsParam, ChatMessageParam


def resolve_adapter(engine: "Engine", model: str | None) -> str | None:
    """The adapter a request names (None for the base model); 404 in vLLM's words for anything else."""
    if not model or model == engine.served_model_name:
        return None
    if model in engine.adapters:
        return model
    raise model_not_found(model)


def _message_to_template(index: int, message: "ChatMessageParam") -> dict[str, Any]:
    data: dict[str, Any] = {k: v for k, v in message.model_dump(exclude_none=True).items()}
    content = message.content
    if isinstance(content, list):
        texts = []
        for part in content:
            kind = part.get("type", "text" if "text" in part else None)
            if kind != "text" or not isinstance(part.get("text"), str):
                raise BadRequest(
                    f"Unsupported content part type {kind!r} in messages[{index}]: this server accepts only "
                    '{"type": "text", "text": ...} parts.',
                    param=f"messages.{index}.content",
                )
            texts.append(part["text"])
        data["content"] = "\n".join(texts)
    elif content is None:
        data["content"] = ""  # assistant turns with tool_calls only; templates expect a string
    return data


def render_chat(
    engine: "Engine",
    messages: list["ChatMessageParam"],
    *,
    add_generation_prompt: bool,
    continue_final_message: bool,
    tools: list["ChatCompletionToolsParam"] | None = None,
    documents: list[dict[str, str]] | None = None,
    chat_template: str | None = None,
    chat_template_kwargs: dict[str, Any] | None = None,
) -> str:
    if chat_template is not None or (chat_template_kwargs or {}).get("chat_template") is not None:
        # vLLM refuses request-supplied templates unless started with --trust-request-chat-template
        raise BadRequest(
            "Chat template is passed with request, but --trust-request-chat-template is not set. "
            "Refused request with untrusted chat template.",
            param="chat_template",
        )
    if not messages:
        raise BadRequest("`messages` must contain at least one message.", param="messages")
    if add_generation_prompt and continue_final_message:
        raise BadRequest("Cannot set both `continue_final_message` and `add_generation_prompt` to True.")
    tokenizer = engine.tokenizer
    if getattr(tokenizer, "chat_template", None) is None:
        raise BadRequest("The model's tokenizer has no chat template; use /v1/completions.", param="messages")
    kwargs = dict(chat_template_kwargs or {})
    kwargs.update(add_generation_prompt=add_generation_prompt, continue_final_message=continue_final_message)
    if tools:
        kwargs["tools"] = [tool.model_dump(exclude_none=True) for tool in tools]
    if documents is not None:
        kwargs["documents"] = documents
    conversation = [_message_to_template(i, m) for i, m in enumerate(messages)]
    try:
        text = tokenizer.apply_chat_template(conversation, tokenize=False, **kwargs)
    except Exception as exc:  # jinja2 TemplateError, raise_exception(...) in templates, ValueError: caller input
        raise BadRequest(f"Could not render the chat template: {exc}", param="messages") from exc
    return str(text)


def check_tools(tools: list["ChatCompletionToolsParam"] | None, choice: str | dict[str, Any] | None) -> None:
    """vLLM's check_tool_usage; tools are rendered by the chat template, tool calls are not parsed (no parser)."""
    if tools == []:
        raise BadRequest(
            "`tools` must not be an empty array. Either provide at least one tool or omit the field entirely.",
            param="tools",
        )
    if choice in (None, "none"):
        return
    if not tools:
        raise BadRequest("When using `tool_choice`, `tools` must be set.", param="tool_choice")
    if isinstance(choice, str) and choice not in ("auto", "required"):
        raise BadRequest(
            f'Invalid value for `tool_choice`: {choice}! Only named tools, "none", "auto" or "required" are supported.',
            param="tool_choice",
        )
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name")
        if name not in {tool.function.name for tool in tools}:
            raise BadRequest(
                "The tool specified in `tool_choice` does not match any of the specified `tools`", param="tool_choice"
            )


def encode(engine: "Engine", text: str, *, add_special_tokens: bool) -> list[int]:
    return list(engine.tokenizer.encode(text, add_special_tokens=add_special_tokens))


def check_token_ids(engine: "Engine", ids: list[int], *, param: str) -> None:
    if not ids:
        raise BadRequest("Either prompt or prompt_embeds must be provided and non-empty.", param=param)
    if min(ids) < 0:
        raise BadRequest(f"Token ids must be non-negative, got {min(ids)}.", param=param)
    if max(ids) >= engine.vocab_size:  # vLLM's wording; we add the size
        raise BadRequest(
            f"Token id {max(ids)} is out of vocabulary (vocabulary size {engine.vocab_size}).", param=param
        )


def truncate(ids: list[int], truncate_prompt_tokens: int | None, max_model_len: int) -> list[int]:
    """vLLM's truncate_prompt_tokens: keep the last k tokens (-1: the model's limit)."""
    if truncate_prompt_tokens is None:
        return ids
    if truncate_prompt_tokens < -1:
        raise BadRequest("truncate_prompt_tokens must be -1 or a non-negative integer.", param="truncate_prompt_tokens")
    if truncate_prompt_tokens > max_model_len:
        raise BadRequest(
            "truncate_prompt_tokens value is greater than max_model_len. Please, select a smaller truncation size.",
            param="truncate_prompt_tokens",
        )
    keep = max_model_len if truncate_prompt_tokens == -1 else truncate_prompt_tokens
    return ids[-keep:] if keep else ids


def check_context(engine: "Engine", n_prompt: int, max_tokens: int | None, max_tokens_param: str) -> None:
    """vLLM's `_validate_input`: the prompt must leave room, and prompt + max_tokens must fit max_model_len."""
    limit = engine.max_model_len
    if n_prompt >= limit:
        raise BadRequest(
            f"This model's maximum context length is {limit} tokens. However, your request has {n_prompt} input "
            "tokens. Please reduce the length of the input messages.",
            param="input_tokens",
        )
    if max_tokens is not None and n_prompt + max_tokens > limit:
        raise BadRequest(
            f"'max_tokens' or 'max_completion_tokens' is too large: {max_tokens}. This model's maximum context "
            f"length is {limit} tokens and your request has {n_prompt} input tokens ({max_tokens} > {limit} - "
            f"{n_prompt}).",
            param=max_tokens_param,
        )


def token_strings(engine: "Engine", ids: list[int]) -> dict[int, str]:
    """Decoded text of each distinct id (special tokens kept), as vLLM reports tokens in logprobs."""
    unique = list(dict.fromkeys(ids))
    decoded = engine.tokenizer.batch_decode([[i] for i in unique], skip_special_tokens=False)
    return dict(zip(unique, decoded))
