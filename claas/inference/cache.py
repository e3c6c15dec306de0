"""CompletionCache: what the inference server really produced for each completion the gateway served.

Per completion: the exact prompt token ids, response token ids and per-token logprobs reported by the server
(`return_token_ids` + `logprobs`), the request messages and the served model (a lora_id or the base model). Feedback
on a cached completion trains on exactly these tokens (DESIGN §4.2), instead of re-tokenizing text.

Two keys: the completion id (`chatcmpl-...`, or `<id>-<i>` for choice i > 0) and a hash of the normalized text,
for clients that only send the answer back (both the full text and the visible text are indexed, so an answer with
its think block stripped still matches).

Bounded twice, with LRU eviction: by entries and by bytes (an estimate of what each entry holds: its token ids,
logprobs, texts and messages), so a few huge completions cannot take the memory that thousands of short ones would
fit in. Built on cachetools' `TTLCache` (size by `getsizeof`, TTL on an injectable clock). Meant for one asyncio
event loop: methods never await, so no lock is needed.

Not here: persistence (a restart forgets the cache; feedback then falls back to tokenizing the text).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cachetools import TTLCache

from claas.inference.helpers import text_key

logger = logging.getLogger(__name__)

#: Default byte bound (CLAAS_COMPLETION_CACHE_MAX_BYTES).
DEFAULT_MAX_BYTES = 256 * 1024 * 1024
#: Bytes per token id / logprob in a Python list (an 8-byte pointer plus the int or float object it points at).
_BYTES_PER_NUMBER = 8 + 32
_ENTRY_OVERHEAD_BYTES = 1024


@dataclass
class CachedCompletion:
    completion_id: str
    model: str  # the served model id (a lora_id or the base model)
    messages: list[dict[str, Any]]  # request messages, or [{"role": "user", "content": prompt}] for /v1/completions
    prompt_token_ids: list[int]  # exact, from the server's return_token_ids
    response_token_ids: list[int]  # exact
    response_logprobs: list[float]  # one per response token, from the server
    response_text: str  # the full generated text (think blocks included)
    visible_text: str  # what the client saw (think stripped if the client asked for that)
    # The API key scope that requested it (its lora-id prefix; None for an admin key or with auth off): feedback
    # from another scope may not train on this conversation unless it was served by the caller's own adapter.
    owner: str | None = None
    created_at: float = field(default_factory=time.time)  # wall clock, for records; expiry uses the cache's clock


def entry_bytes(entry: CachedCompletion) -> int:
    """An estimate of the memory one cached completion holds (what the byte bound counts)."""
    numbers = len(entry.prompt_token_ids) + len(entry.response_token_ids) + len(entry.response_logprobs)
    texts = len(entry.response_text.encode()) + len(entry.visible_text.encode())
    messages = len(json.dumps(entry.messages, default=str).encode())
    return _ENTRY_OVERHEAD_BYTES + _BYTES_PER_NUMBER * numbers + 2 * texts + 2 * messages


# A cached value: the entry, its text-index keys and its byte estimate.
_Value = tuple[CachedCompletion, tuple[str, ...], int]


class _Entries(TTLCache[str, _Value, float]):
    """TTLCache that reports every entry it drops (LRU eviction for size, or expiry), so the text index follows."""

    def __init__(self, max_bytes: int, ttl_s: float, timer: Callable[[], float],
                 on_drop: Callable[[str, _Value], None]) -> None:
        super().__init__(maxsize=max_bytes, ttl=ttl_s, timer=timer, getsizeof=lambda value: value[2])
        self._on_drop = on_drop

    def popitem(self) -> tuple[str, _Value]:
        key, value = super().popitem()
        self._on_drop(key, value)
        return key, value

    def expire(self, time: float | None = None) -> list[tuple[str, _Value]]:
        expired = list(super().expire(time))
        for key, value in expired:
            self._on_drop(key, value)
        return expired


class CompletionCache:
    def __init__(
        self,
        max_entries: int,
        ttl_s: float,
        clock: Callable[[], float] = time.monotonic,
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        on_lookup: Callable[[bool], None] | None = None,
    ) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be >= 1")
        if ttl_s <= 0:
            raise ValueError("ttl_s must be > 0")
        if max_bytes < 1:
            raise ValueError("max_bytes must be >= 1")
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self._on_lookup = on_lookup
        self._entries = _Entries(max_bytes, ttl_s, clock, self._unindex)
        self._by_text: dict[str, dict[str, None]] = {}  # text hash -> completion ids (insertion-ordered set)
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        self._entries.expire()
        return len(self._entries)

    @property
    def bytes(self) -> int:
        """The byte estimate of every entry held (at most `max_bytes`)."""
        self._entries.expire()
        return int(self._entries.currsize)

    def put(self, entry: CachedCompletion) -> None:
        replaced = self._entries.pop(entry.completion_id, None)
        if replaced is not None:
            self._unindex(entry.completion_id, replaced)
        size = entry_bytes(entry)
        if size > self.max_bytes:  # cachetools refuses it; one completion larger than the whole bound is not kept
            logger.debug("completion %s (%d bytes) exceeds the cache's %d bytes", entry.completion_id, size,
                         self.max_bytes)
            return
        keys = tuple(dict.fromkeys((text_key(entry.response_text), text_key(entry.visible_text))))
        self._entries[entry.completion_id] = (entry, keys, size)
        for key in keys:
            self._by_text.setdefault(key, {})[entry.completion_id] = None
        while len(self._entries) > self.max_entries:
            self._entries.popitem()

    def get(self, completion_id: str) -> CachedCompletion | None:
        entry = self._live(completion_id)
        return self._count(entry)

    def find(self, response_text: str, *, model: str | None = None) -> CachedCompletion | None:
        """The most recent live completion whose full or visible text normalizes like `response_text`."""
        self._entries.expire()
        ids = self._by_text.get(text_key(response_text))
        found = None
        if ids:
            for completion_id in reversed(list(ids)):
                entry = self._live(completion_id)
                if entry is not None and (model is None or entry.model == model):
                    found = entry
                    break
        return self._count(found)

    def candidates(self, response_text: str) -> list[CachedCompletion]:
        """Every live completion whose full or visible text normalizes like `response_text`, most recent first.
        Not counted as a lookup: the caller picks one and reports it with `hit`."""
        self._entries.expire()
        ids = self._by_text.get(text_key(response_text))
        live = (self._live(completion_id) for completion_id in reversed(list(ids or ())))
        return [entry for entry in live if entry is not None]

    def hit(self, entry: CachedCompletion | None) -> CachedCompletion | None:
        """Count the outcome of a lookup made with `candidates` (a hit when `entry` is not None)."""
        return self._count(entry)

    def _live(self, completion_id: str) -> CachedCompletion | None:
        self._entries.expire()
        value = self._entries.get(completion_id)  # a hit moves it to the most recently used end
        return None if value is None else value[0]

    def _count(self, entry: CachedCompletion | None) -> CachedCompletion | None:
        if entry is None:
            self.misses += 1
        else:
            self.hits += 1
        if self._on_lookup is not None:
            self._on_lookup(entry is not None)
        return entry

    def _unindex(self, completion_id: str, value: _Value) -> None:
        for key in value[1]:
            ids = self._by_text.get(key)
            if ids is not None:
                ids.pop(completion_id, None)
                if not ids:
                    del self._by_text[key]
