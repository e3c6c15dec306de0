"""Fit a chat prompt into the model's context (`CLAAS_CONTEXT_OVERFLOW=trim`).

By default (`error`) a prompt longer than the model's context goes to the server as is and the client gets the
server's 400 (vLLM's "This model's maximum context length is ... tokens"). With `trim`, the gateway first fits the
prompt: it drops the oldest conversation turns (system messages and the last user turn, with what follows it, are
kept), then shortens the system prompt, and says so in a visible marker in the system prompt, so the model and
anyone reading the cached conversation can tell. If the last user turn alone does not fit, the prompt is sent
unchanged and the server's 400 reaches the client (never a 500).

Token counts come from the server's own `/tokenize` with the chat template, so they are exact for that server.
The budget leaves room for the answer: `max_completion_tokens` / `max_tokens` when given, else MIN_ANSWER_TOKENS.

Not here: where it is applied (claas.inference.proxy), the setting (claas.core.config).
"""

from __future__ import annotations

import logging
from typing import Any

from claas.core.chat import message_text
from claas.inference.base import InferenceBackend

logger = logging.getLogger(__name__)

MIN_ANSWER_TOKENS = 64
SHORTEN_ROUNDS = 4
DROPPED_MARKER = "[CLaaS: {n} earlier message(s) were left out to fit the model's {limit}-token context.]"
SHORTENED_MARKER = "\n[CLaaS: the system prompt was shortened here to fit the model's {limit}-token context.]"


async def context_length(inference: InferenceBackend, model: str | None) -> int | None:
    """`max_model_len` of the served model's card (an adapter's, else its base model's), if the server says."""
    cards = await inference.models()
    by_id = {str(card.get("id")): card for card in cards}
    card = by_id.get(model or "") or next((c for c in cards if c.get("parent") is None), None)
    if card is None:
        return None
    length = card.get("max_model_len")
    if length is None and card.get("parent") is not None:
        length = (by_id.get(str(card.get("parent"))) or {}).get("max_model_len")
    return int(length) if isinstance(length, int) and length > 0 else None


def answer_tokens(payload: dict[str, Any]) -> int:
    for name in ("max_completion_tokens", "max_tokens"):
        value = payload.get(name)
        if isinstance(value, int) and value > 0:
            return value
    return MIN_ANSWER_TOKENS


def _last_user_index(messages: list[dict[str, Any]]) -> int:
    for index in range(len(messages) - 1, -1, -1):
        if messages[index].get("role") == "user":
            return index
    return len(messages) - 1


def _with_system_note(messages: list[dict[str, Any]], note: str) -> list[dict[str, Any]]:
    """Append `note` to the first system message (string content), or add a system message with it."""
    for index, message in enumerate(messages):
        if message.get("role") in ("system", "developer"):
            text = message_text(message.get("content"))
            return [*messages[:index], {**message, "content": f"{text}\n{note}" if text else note},
                    *messages[index + 1 :]]
    return [{"role": "system", "content": note}, *messages]


class ContextFitter:
    def __init__(self, inference: InferenceBackend) -> None:
        self.inference = inference

    async def _count(self, messages: list[dict[str, Any]]) -> int:
        # Base and adapters share the chat template; no model name, so an adapter not loaded yet is no 404 here.
        return len(await self.inference.tokenize_messages(messages, add_generation_prompt=True))

    async def fit(self, payload: dict[str, Any]) -> list[dict[str, Any]] | None:
        """Messages that fit the context, or None when the request needs no change (or cannot be fitted)."""
        messages: list[dict[str, Any]] = payload["messages"]
        model = payload.get("model")
        limit = await context_length(self.inference, model)
        if limit is None:
            return None
        budget = limit - answer_tokens(payload)
        count = await self._count(messages)
        if count <= budget:
            return None
        keep_from = _last_user_index(messages)
        head = [m for m in messages[:keep_from] if m.get("role") in ("system", "developer")]
        history = [m for m in messages[:keep_from] if m.get("role") not in ("system", "developer")]
        tail = messages[keep_from:]
        dropped = 0
        candidate = messages
        while history and count > budget:
            history = history[1:]
            while history and history[0].get("role") not in ("user",):  # start at a user turn
                history = history[1:]
            dropped = len(messages) - len(head) - len(history) - len(tail)
            candidate = _with_system_note([*head, *history, *tail], DROPPED_MARKER.format(n=dropped, limit=limit))
            count = await self._count(candidate)
        if count > budget and head:
            candidate = await self._shorten_system(candidate, count, budget, limit)
            count = await self._count(candidate)
        if count > budget:
            logger.info("prompt of %d tokens does not fit %d even trimmed; sent as is", count, budget)
            return None
        logger.info("prompt trimmed to fit %d tokens: %d message(s) dropped, now %d tokens", limit, dropped, count)
        return candidate

    async def _shorten_system(
        self, messages: list[dict[str, Any]], count: int, budget: int, limit: int
    ) -> list[dict[str, Any]]:
        """Cut the first system message's text from the end, keeping its start, until the prompt fits."""
        index = next(i for i, m in enumerate(messages) if m.get("role") in ("system", "developer"))
        original = message_text(messages[index].get("content"))
        marker = SHORTENED_MARKER.format(limit=limit)
        text = original
        for _ in range(SHORTEN_ROUNDS):
            if count <= budget or not text:
                break
            system_tokens = max(1, len(await self.inference.tokenize_text(text)))
            excess = count - budget
            keep_tokens = system_tokens - excess - 16  # the marker's own tokens and rounding
            chars_per_token = len(text) / system_tokens
            text = text[: max(0, int(keep_tokens * chars_per_token))]
            messages = [*messages[:index], {**messages[index], "content": text + marker}, *messages[index + 1 :]]
            count = await self._count(messages)
        return messages
