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


def check_messages(messages: list[Any]) -> None:
    """Raise ValueError naming the first message that is not an OpenAI chat message: an object with a string
    `role` and a `content` that is a string, a list of `{type: ...}` parts, or null."""
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"message {index} must be an object, not {type(message).__name__}")
        if not isinstance(message.get("role"), str):
            raise ValueError(f"message {index} needs a string 'role'")
        content = message.get("content")
        if content is None or isinstance(content, str):
            continue
        if not isinstance(content, list):
            raise ValueError(
                f"message {index} 'content' must be a string or a list of content parts, not {type(content).__name__}"
            )
        for part in content:
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                raise ValueError(f"message {index} 'content' parts must be objects with a string 'type'")
            if part["type"] == "text" and not isinstance(part.get("text"), str):
                raise ValueError(f"message {index} has a text part without a string 'text'")
