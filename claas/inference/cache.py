"""CompletionCache: what the inference server really produced for each completion the gateway served.

Per completion: the exact prompt token ids, response token ids and per-token logprobs reported by the server
(`return_token_ids` + `logprobs`), the request messages and the served model (a lora_id or the base model). Feedback
on a cached completion trains on exactly these tokens (DESIGN §4.2), instead of re-tokenizing text.

Two keys: the completion id (`chatcmpl-...`, or `<id>-<i>` for choice i > 0) and a hash of the normalized text,
for clients that only send the answer back (both the full text and the visible text are indexed, so an answer with
its think block stripped still matches).

Bounded (LRU eviction) with a TTL measured by an injectable clock. Meant for one asyncio event loop: methods never
await, so no lock is needed.

Not here: persistence (a restart forgets the cache; feedback then falls back to tokenizing the text).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from claas.inference.helpers import text_key


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


class CompletionCache:
    def __init__(
        self,
        max_entries: int,
        ttl_s: float,
        clock: Callable[[], float] = time.monotonic,
        *,
        on_lookup: Callable[[bool], None] | None = None,
    ) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be >= 1")
        if ttl_s <= 0:
            raise ValueError("ttl_s must be > 0")
        self.max_entries = max_entries
        self.ttl_s = ttl_s
        self._clock = clock
        self._on_lookup = on_lookup
        self._entries: OrderedDict[str, tuple[CachedCompletion, float, tuple[str, ...]]] = OrderedDict()
        self._by_text: dict[str, dict[str, None]] = {}  # text hash -> completion ids (insertion-ordered set)
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, entry: CachedCompletion) -> None:
        if entry.completion_id in self._entries:
            self._remove(entry.completion_id)
        keys = tuple(dict.fromkeys((text_key(entry.response_text), text_key(entry.visible_text))))
        self._entries[entry.completion_id] = (entry, self._clock() + self.ttl_s, keys)
        for key in keys:
            self._by_text.setdefault(key, {})[entry.completion_id] = None
        self._evict()

    def get(self, completion_id: str) -> CachedCompletion | None:
        entry = self._live(completion_id)
        return self._count(entry)

    def find(self, response_text: str, *, model: str | None = None) -> CachedCompletion | None:
        """The most recent live completion whose full or visible text normalizes like `response_text`."""
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
        ids = self._by_text.get(text_key(response_text))
        live = (self._live(completion_id) for completion_id in reversed(list(ids or ())))
        return [entry for entry in live if entry is not None]

    def hit(self, entry: CachedCompletion | None) -> CachedCompletion | None:
        """Count the outcome of a lookup made with `candidates` (a hit when `entry` is not None)."""
        return self._count(entry)

    def _live(self, completion_id: str) -> CachedCompletion | None:
        item = self._entries.get(completion_id)
        if item is None:
            return None
        entry, expires_at, _ = item
        if self._clock() >= expires_at:
            self._remove(completion_id)
            return None
        self._entries.move_to_end(completion_id)
        return entry

    def _count(self, entry: CachedCompletion | None) -> CachedCompletion | None:
        if entry is None:
            self.misses += 1
        else:
            self.hits += 1
        if self._on_lookup is not None:
            self._on_lookup(entry is not None)
        return entry

    def _evict(self) -> None:
        now = self._clock()
        while self._entries:
            oldest_id, (_, expires_at, _) = next(iter(self._entries.items()))
            if len(self._entries) > self.max_entries or now >= expires_at:
                self._remove(oldest_id)
            else:
                return

    def _remove(self, completion_id: str) -> None:
        _, _, keys = self._entries.pop(completion_id)
        for key in keys:
            ids = self._by_text.get(key)
            if ids is not None:
                ids.pop(completion_id, None)
                if not ids:
                    del self._by_text[key]
