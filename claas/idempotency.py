"""`Idempotency-Key` for `POST /v1/feedback` and `POST /v1/distill`: a retry returns the first outcome instead of
training the same step again.

A key is scoped to the caller's API key scope and bound to the request body (a different body under the same key is
422). Outcomes are kept in memory (bounded, `TTL_S`) and written as small JSON files under
`<CLAAS_FEEDBACK_LOG_DIR>/.idempotency/`, so another API process on the same log directory, or this one after a
restart, replays them too. Recorded: successes, 4xx refusals, and "saved but not served" (a retry then only reloads
the adapter on the inference server, and records the success). Not recorded: other failures, where nothing was
applied; a retry runs again. A retry that arrives while the first request runs in this process waits for it.

Not here: a concurrent retry in another process while the first is still running (it is not visible until done;
the adapter's lock still orders the two steps).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from claas.errors import ClaasError, ServingStaleError, UnprocessableError

logger = logging.getLogger(__name__)

HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"
TTL_S = 24 * 3600.0
MAX_ENTRIES = 10_000
MAX_KEY_LENGTH = 255


@dataclass
class Outcome:
    fingerprint: str
    status: int
    body: dict[str, Any]
    headers: dict[str, str]
    stale_lora: str | None = None  # saved but not served: a retry reloads this adapter
    result: dict[str, Any] | None = None  # the distill result of a saved-but-not-served step
    recorded_at: float = 0.0


Reply = tuple[int, dict[str, Any], dict[str, str]]


class IdempotencyStore:
    def __init__(self, directory: Path | None) -> None:
        self.directory = directory
        self._outcomes: OrderedDict[str, Outcome] = OrderedDict()
        self._running: dict[str, asyncio.Event] = {}

    async def run(
        self,
        key: str,
        scope: str | None,
        body: str,
        execute: Callable[[], Awaitable[dict[str, Any]]],
        reload: Callable[[str], Awaitable[None]],
    ) -> Reply:
        """The reply to a request carrying `key`: the recorded one, or `execute()`'s (recorded when it is final)."""
        if not key or len(key) > MAX_KEY_LENGTH:
            raise UnprocessableError(f"{HEADER} must be 1-{MAX_KEY_LENGTH} characters", param=HEADER)
        slot = hashlib.sha256(f"{scope or ''}\0{key}".encode()).hexdigest()
        fingerprint = hashlib.sha256(body.encode()).hexdigest()
        while True:
            outcome = self._lookup(slot)
            if outcome is not None:
                if outcome.fingerprint != fingerprint:
                    raise UnprocessableError(
                        f"this {HEADER} was used with a different request body; use a new key for a new request",
                        param=HEADER,
                    )
                return await self._replay(slot, outcome, reload)
            running = self._running.get(slot)
            if running is None:
                break
            await running.wait()  # the first request with this key is still running here: its outcome is ours
        done = self._running[slot] = asyncio.Event()
        try:
            return await self._first(slot, fingerprint, execute)
        finally:
            del self._running[slot]
            done.set()

    async def _first(self, slot: str, fingerprint: str, execute: Callable[[], Awaitable[dict[str, Any]]]) -> Reply:
        try:
            body = await execute()
        except ServingStaleError as exc:
            self._record(slot, Outcome(fingerprint, exc.status_code, exc.to_body(), exc.headers(),
                                       stale_lora=exc.lora_id, result=exc.result))
            raise
        except ClaasError as exc:
            if exc.status_code < 500 and exc.status_code != 409:  # a final refusal (409 busy may pass on retry)
                self._record(slot, Outcome(fingerprint, exc.status_code, exc.to_body(), exc.headers() or {}))
            raise
        self._record(slot, Outcome(fingerprint, 200, body, {}))
        return 200, body, {}

    async def _replay(self, slot: str, outcome: Outcome, reload: Callable[[str], Awaitable[None]]) -> Reply:
        replayed = {REPLAYED_HEADER: "true"}
        if outcome.stale_lora is None:
            return outcome.status, outcome.body, {**outcome.headers, **replayed}
        try:
            await reload(outcome.stale_lora)
        except ClaasError as exc:
            logger.warning("replaying %s: reloading %s failed again: %s", slot[:12], outcome.stale_lora, exc.message)
            return outcome.status, outcome.body, {**outcome.headers, **replayed}
        body = {"status": "ok", "lora_id": outcome.stale_lora, "distill_result": outcome.result, "reloaded": True}
        self._record(slot, Outcome(outcome.fingerprint, 200, body, {}))
        return 200, body, replayed

    # --- storage ---------------------------------------------------------------------------------------------------

    def _lookup(self, slot: str) -> Outcome | None:
        outcome = self._outcomes.get(slot)
        if outcome is None and self.directory is not None:
            path = self.directory / f"{slot}.json"
            try:
                outcome = Outcome(**json.loads(path.read_text()))
            except FileNotFoundError:
                return None
            except (OSError, ValueError, TypeError) as exc:
                logger.warning("ignoring unreadable idempotency record %s: %s", path.name, exc)
                return None
        if outcome is None or time.time() - outcome.recorded_at > TTL_S:
            return None
        self._outcomes[slot] = outcome
        self._outcomes.move_to_end(slot)
        return outcome

    def _record(self, slot: str, outcome: Outcome) -> None:
        outcome.recorded_at = time.time()
        self._outcomes[slot] = outcome
        self._outcomes.move_to_end(slot)
        while len(self._outcomes) > MAX_ENTRIES:
            self._outcomes.popitem(last=False)
        if self.directory is None:
            return
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            tmp = self.directory / f".{slot}.{uuid.uuid4().hex[:8]}.tmp"
            tmp.write_text(json.dumps(asdict(outcome), default=str))
            tmp.replace(self.directory / f"{slot}.json")
        except OSError as exc:  # memory still has it: this process replays; others would not
            logger.warning("could not persist an idempotency record: %s", exc)
