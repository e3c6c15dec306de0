"""Small pure helpers of the inference proxy: SSE framing and parsing, `<think>` block handling, cache-key text.

Everything here works on strings and bytes only (no I/O), so it is tested directly.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
_THINK_BLOCK = re.compile(r"<think>.*?(?:</think>|\Z)", re.DOTALL)

SSE_DONE = b"data: [DONE]\n\n"


# --- SSE ---------------------------------------------------------------------------------------------------------


def sse_event(data: dict[str, Any]) -> bytes:
    """One server-sent event carrying a JSON object, framed as vLLM/OpenAI do (`data: {...}\\n\\n`)."""
    return b"data: " + json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


class SseParser:
    """Incremental parser: feed raw bytes as they arrive, get the `data` payload of every completed event.

    Events end with a blank line (`\\n\\n`, `\\r\\n\\r\\n`); several `data:` lines of one event are joined with
    newlines (the SSE spec); comments (`:`) and other fields (`event:`, `id:`) are ignored.
    """

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, chunk: bytes) -> list[str]:
        self._buffer += chunk
        if b"\r" in self._buffer:
            self._buffer = self._buffer.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        events: list[str] = []
        while True:
            end = self._buffer.find(b"\n\n")
            if end < 0:
                return events
            raw, self._buffer = self._buffer[:end], self._buffer[end + 2 :]
            data = _event_data(raw)
            if data is not None:
                events.append(data)

    def flush(self) -> list[str]:
        """Payload of a last event the server did not terminate with a blank line."""
        raw, self._buffer = self._buffer.strip(b"\n"), b""
        data = _event_data(raw) if raw else None
        return [data] if data is not None else []


def _event_data(raw: bytes) -> str | None:
    lines = []
    for line in raw.split(b"\n"):
        if line.startswith(b"data:"):
            value = line[5:]
            lines.append(value[1:] if value.startswith(b" ") else value)
    if not lines:
        return None
    return b"\n".join(lines).decode("utf-8")


# --- think blocks --------------------------------------------------------------------------------------------------


def strip_think(text: str) -> str:
    """The text without `<think>...</think>` blocks (an unterminated block runs to the end).

    Also handles templates that open the think block inside the prompt (Qwen3 with thinking forced): a `</think>`
    with no `<think>` before it ends a block that started before the response. Leading whitespace after a removed
    block is dropped, as reasoning models put a blank line between the block and the answer.
    """
    if THINK_CLOSE not in text and THINK_OPEN not in text:
        return text
    close = text.find(THINK_CLOSE)
    opened = text.find(THINK_OPEN)
    if close >= 0 and (opened < 0 or close < opened):
        text = text[close + len(THINK_CLOSE) :].lstrip()
    stripped = _THINK_BLOCK.sub("", text)
    return stripped.lstrip() if stripped != text else stripped


class ThinkStripper:
    """Removes `<think>...</think>` from a stream of text deltas without buffering more than a partial tag.

    Limitation: a `</think>` without an opening tag in the response (think block opened by the prompt) cannot be
    recognised while streaming without holding the whole answer back, so it is passed through.
    """

    def __init__(self) -> None:
        self._inside = False
        self._pending = ""
        self._seen_text = False  # emitted anything but whitespace yet
        self._leading_space = ""  # whitespace before the first text, dropped if a think block came before it
        self._removed_block = False

    def feed(self, delta: str) -> str:
        buffer = self._pending + delta
        out: list[str] = []
        while buffer:
            if self._inside:
                end = buffer.find(THINK_CLOSE)
                if end < 0:
                    keep = _partial_tag_suffix(buffer, THINK_CLOSE)
                    buffer = buffer[len(buffer) - keep :] if keep else ""
                    break
                buffer = buffer[end + len(THINK_CLOSE) :]
                self._inside = False
                self._removed_block = True
            else:
                start = buffer.find(THINK_OPEN)
                if start >= 0:
                    out.append(buffer[:start])
                    buffer = buffer[start + len(THINK_OPEN) :]
                    self._inside = True
                    continue
                keep = _partial_tag_suffix(buffer, THINK_OPEN)
                out.append(buffer[: len(buffer) - keep])
                buffer = buffer[len(buffer) - keep :] if keep else ""
                break
        self._pending = buffer
        return self._emit("".join(out))

    def flush(self) -> str:
        """Text held back at the end of the stream (a partial `<thi` that never became a tag)."""
        rest, self._pending = ("" if self._inside else self._pending), ""
        text = self._emit(rest)
        if not self._seen_text and not self._removed_block:
            text, self._leading_space = self._leading_space + text, ""
        return text

    def _emit(self, text: str) -> str:
        """Same leading-whitespace rule as `strip_think`: whitespace before the first text is dropped when a think
        block was removed before it."""
        if self._seen_text or not text:
            return text
        stripped = text.lstrip()
        self._leading_space += text[: len(text) - len(stripped)]
        if not stripped:
            return ""
        self._seen_text = True
        lead, self._leading_space = ("" if self._removed_block else self._leading_space), ""
        return lead + stripped


def _partial_tag_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:size]):
            return size
    return 0


# --- cache keys ----------------------------------------------------------------------------------------------------


def normalize_text(text: str) -> str:
    """The form two renderings of one answer share: think blocks removed, whitespace collapsed, stripped."""
    return " ".join(strip_think(text).split())


def text_key(text: str) -> str:
    """Hash of the normalized text: the completion cache's second key."""
    return hashlib.blake2b(normalize_text(text).encode("utf-8"), digest_size=16).hexdigest()
