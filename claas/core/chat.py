"""Chat-message text, as the inference server sees it (no torch, so the gateway can use it)."""

from __future__ import annotations

from typing import Any


def message_text(content: Any) -> str:
    """Flatten OpenAI message content (a string or a list of `{type: text}` parts) to text, joining parts with a
    newline as vLLM and `claas model-server` do when they render the chat template."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "\n".join(part.get("text", "") for part in content if isinstance(part, dict) and part.get("type") == "text")


def last_user_text(messages: list[dict[str, Any]]) -> str:
    for message in reversed(messages):
        if message.get("role") == "user":
            return message_text(message.get("content"))
    return ""
