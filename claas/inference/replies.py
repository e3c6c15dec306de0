"""Pure functions on the inference server's reply dicts: what the cache needs from a reply or a stream of chunks,
and how a reply is cut down to what the client asked for (logprobs, token ids, think blocks).

No I/O; the proxy (claas.inference.proxy) calls these.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from claas.errors import UpstreamError
from claas.inference.helpers import ThinkStripper, strip_think
from claas.inference.wire import ChatCompletionRequest, CompletionRequest, ReplyOptions

REASONING_FIELDS = ("reasoning", "reasoning_content")


@dataclass
class ChoiceAccumulator:
    text: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    prompt_token_ids: list[int] | None = None
    complete_ids: bool = True


def request_messages(request: ChatCompletionRequest | CompletionRequest, index: int) -> list[dict[str, Any]]:
    if isinstance(request, ChatCompletionRequest):
        return request.messages
    return [{"role": "user", "content": request.prompt_text(index)}]


def full_text(content: str | None, message: dict[str, Any]) -> str:
    """The generated text with a server-separated reasoning part (vLLM reasoning parsers) put back as a think block."""
    reasoning = next((message[name] for name in REASONING_FIELDS if message.get(name)), None)
    return (f"<think>{reasoning}</think>" if reasoning else "") + (content or "")


def accumulate(acc: ChoiceAccumulator, choice: dict[str, Any], *, chat: bool) -> None:
    holder = (choice.get("delta") or {}) if chat else choice
    text = holder.get("content" if chat else "text")
    if text:
        acc.text.append(text)
    reasoning = next((holder[name] for name in REASONING_FIELDS if holder.get(name)), None)
    if reasoning:
        acc.reasoning.append(reasoning)
    if chat:
        acc.logprobs.extend(item.get("logprob") for item in ((choice.get("logprobs") or {}).get("content") or ()))
    else:
        acc.logprobs.extend((choice.get("logprobs") or {}).get("token_logprobs") or ())
        if choice.get("prompt_token_ids") is not None:
            acc.prompt_token_ids = choice["prompt_token_ids"]
    if choice.get("token_ids") is not None:
        acc.token_ids.extend(choice["token_ids"])
    elif text or reasoning:
        acc.complete_ids = False  # text without ids: the server does not support return_token_ids in streams


def shape_reply(response: dict[str, Any], want: ReplyOptions, *, chat: bool) -> None:
    """Remove from a non-streamed reply what the client did not ask for (in place)."""
    if not want.token_ids:
        response.pop("prompt_token_ids", None)
    for choice in response.get("choices") or ():
        if not want.logprobs:
            choice["logprobs"] = None
        if not want.token_ids:
            choice.pop("token_ids", None)
            choice.pop("prompt_token_ids", None)
        if want.strip_thinking:
            if chat:
                message = choice.get("message") or {}
                for name in REASONING_FIELDS:
                    message.pop(name, None)
                if isinstance(message.get("content"), str):
                    message["content"] = strip_think(message["content"])
            elif isinstance(choice.get("text"), str):
                choice["text"] = strip_think(choice["text"])


def shape_chunk(chunk: dict[str, Any], want: ReplyOptions, strippers: dict[int, ThinkStripper], *, chat: bool) -> None:
    if not want.token_ids:
        chunk.pop("prompt_token_ids", None)
    for choice in chunk.get("choices") or ():
        if not want.logprobs:
            choice.pop("logprobs", None)
        if not want.token_ids:
            choice.pop("token_ids", None)
            choice.pop("prompt_token_ids", None)
        if want.strip_thinking:
            stripper = strippers.setdefault(choice.get("index", 0), ThinkStripper())
            holder = choice.get("delta") if chat else choice
            if holder is None:
                continue
            key = "content" if chat else "text"
            for name in REASONING_FIELDS:
                holder.pop(name, None)
            text = stripper.feed(holder.get(key) or "")
            if choice.get("finish_reason") is not None:
                text += stripper.flush()
            if key in holder or text:
                holder[key] = text


def prompt_logprob_entry(positions: list[Any], position: int, token_id: int) -> dict[str, Any]:
    entry = positions[position] if position < len(positions) else None
    if not isinstance(entry, dict):
        raise UpstreamError(502, f"inference server returned no prompt logprob at position {position}")
    found = entry.get(str(token_id), entry.get(token_id))  # type: ignore[call-overload]
    if not isinstance(found, dict):
        raise UpstreamError(
            502, f"inference server returned no prompt logprob for token {token_id} at position {position}"
        )
    return found
