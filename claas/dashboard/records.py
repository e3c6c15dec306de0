"""Feedback records as the feedback transaction writes them (`claas.feedback._write_log`), newest first, one page at a
time, filtered by adapter and by the caller's scope.

Layout: `<feedback_log_dir>/<YYYY-MM-DD>/<HHMMSSffffff>-<request_id>.json`; both names sort lexically in time order,
so paging needs only directory listings plus the files of the page (or, with a filter, the files up to one past it).
Records are parsed leniently: missing fields are None/empty, fields this module does not know are kept in `extra`
(and rendered generically), and a file that is not a JSON object becomes an `unreadable` record.

Not here: writing records, HTML (claas.dashboard.routes and templates).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from claas.core.chat import message_text

logger = logging.getLogger(__name__)

DAY_RE = re.compile(r"\d{4}-\d{2}-\d{2}")
RECORD_KEYS = frozenset(
    {"request_id", "timestamp", "lora_id", "status", "error", "items", "distill_result", "vllm", "timing_ms"}
)
ITEM_KEYS = frozenset({"prompt", "response", "feedback", "source"})
DISTILL_KEYS = frozenset({"metrics", "timing_ms"})


@dataclass(frozen=True)
class RecordItem:
    """One feedback item: the prompt as (role, text) turns, the response, the feedback and what was trained on."""

    messages: list[tuple[str, str]]
    response: str | None
    feedback: str | None
    source: str | None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class FeedbackRecord:
    key: str  # "<day>/<file stem>", unique; used as the HTML anchor
    request_id: str | None = None
    timestamp: str | None = None
    lora_id: str | None = None
    status: str | None = None
    error: dict[str, Any] | None = None
    items: list[RecordItem] = field(default_factory=list)
    distill: dict[str, Any] = field(default_factory=dict)  # distill_result minus metrics / timing_ms
    metrics: dict[str, Any] = field(default_factory=dict)
    distill_timing_ms: dict[str, Any] = field(default_factory=dict)
    timing_ms: dict[str, Any] = field(default_factory=dict)
    vllm: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    unreadable: str | None = None  # why the file could not be read as a record


@dataclass(frozen=True)
class RecordPage:
    records: list[FeedbackRecord]
    page: int
    per_page: int
    has_next: bool
    total: int | None  # matching records; None when a filtered scan stopped early

    @property
    def first_index(self) -> int:
        """1-based position of the first record on this page."""
        return (self.page - 1) * self.per_page + 1


def record_paths(log_dir: Path) -> list[Path]:
    """Every record file under `log_dir`, newest first (`.tmp` files of a write in progress are skipped)."""
    if not log_dir.is_dir():
        return []
    days = sorted((d for d in log_dir.iterdir() if DAY_RE.fullmatch(d.name) and d.is_dir()), reverse=True)
    paths: list[Path] = []
    for day in days:
        files = [f for f in day.iterdir() if f.suffix == ".json" and not f.name.startswith(".") and f.is_file()]
        paths.extend(sorted(files, reverse=True))
    return paths


def load_record(path: Path) -> FeedbackRecord:
    key = f"{path.parent.name}/{path.stem}"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        logger.warning("unreadable feedback record %s: %s", path, exc)
        return FeedbackRecord(key=key, unreadable=f"{type(exc).__name__}: {exc}")
    if not isinstance(data, dict):
        return FeedbackRecord(key=key, unreadable=f"expected a JSON object, found {type(data).__name__}")
    distill = _dict(data.get("distill_result"))
    raw_items = data.get("items")
    return FeedbackRecord(
        key=key,
        request_id=_str(data.get("request_id")),
        timestamp=_str(data.get("timestamp")),
        lora_id=_str(data.get("lora_id")),
        status=_str(data.get("status")),
        error=data["error"] if isinstance(data.get("error"), dict) else None,
        items=[_item(item) for item in raw_items if isinstance(item, dict)] if isinstance(raw_items, list) else [],
        distill={k: v for k, v in distill.items() if k not in DISTILL_KEYS},
        metrics=_dict(distill.get("metrics")),
        distill_timing_ms=_dict(distill.get("timing_ms")),
        timing_ms=_dict(data.get("timing_ms")),
        vllm=_dict(data.get("vllm")),
        extra={k: v for k, v in data.items() if k not in RECORD_KEYS},
    )


def read_page(
    log_dir: Path,
    *,
    page: int,
    per_page: int,
    lora_id: str | None = None,
    allows: Callable[[str], bool] | None = None,
) -> RecordPage:
    """Page `page` (1-based) of the records of `lora_id` (all when None) that `allows` admits (all when None)."""
    if page < 1 or per_page < 1:
        raise ValueError("page and per_page start at 1")
    paths = record_paths(log_dir)
    start = (page - 1) * per_page
    if lora_id is None and allows is None:
        chosen = paths[start : start + per_page]
        return RecordPage([load_record(p) for p in chosen], page, per_page, start + per_page < len(paths), len(paths))
    records: list[FeedbackRecord] = []
    matched = 0
    for path in paths:
        record = load_record(path)
        if record.lora_id is None or (lora_id is not None and record.lora_id != lora_id):
            continue
        if allows is not None and not allows(record.lora_id):
            continue
        if matched >= start + per_page:  # one match past this page: there is a next page; stop reading
            return RecordPage(records, page, per_page, True, None)
        if matched >= start:
            records.append(record)
        matched += 1
    return RecordPage(records, page, per_page, False, matched)


def _item(raw: dict[str, Any]) -> RecordItem:
    return RecordItem(
        messages=_messages(raw.get("prompt")),
        response=_str(raw.get("response")),
        feedback=_str(raw.get("feedback")),
        source=_str(raw.get("source")),
        extra={k: v for k, v in raw.items() if k not in ITEM_KEYS},
    )


def _messages(prompt: Any) -> list[tuple[str, str]]:
    """A prompt string is one user turn; chat messages become (role, text) turns."""
    if isinstance(prompt, str):
        return [("user", prompt)]
    if not isinstance(prompt, list):
        return [] if prompt is None else [("prompt", json.dumps(prompt, default=str))]
    turns: list[tuple[str, str]] = []
    for message in prompt:
        if not isinstance(message, dict):
            continue
        content = message.get("content")
        text = message_text(content) if isinstance(content, (str, list)) or content is None else str(content)
        turns.append((str(message.get("role", "?")), text))
    return turns


def _str(value: Any) -> str | None:
    return None if value is None else value if isinstance(value, str) else str(value)


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}
