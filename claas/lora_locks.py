"""LoraLocks: the per-adapter lock that orders feedback, distill, init and delete of one adapter.

Two layers: an asyncio lock per lora_id (requests of this process queue here, one waiter per adapter), then the
engine store's inter-process lock (another API process on the same adapter root). The store's lock is taken by
polling a non-blocking attempt from the event loop, the way filelock's own acquire polls, so a request waiting for
an adapter that another process holds occupies no thread: waits can never exhaust the default thread pool that
serves list, export and exists.

Entries live only while someone holds or waits for them, so the map does not grow with every adapter ever touched.

Not here: the store's own lock implementation (claas.training.storage) or what runs under the lock (claas.feedback).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any

from claas.errors import ConflictError
from claas.training.engine.base import TrainingEngine
from claas.training.storage import LockHold, LoraLockTimeoutError

#: Seconds between attempts at a store lock another process holds (filelock's default poll interval).
LOCK_POLL_S = 0.05


@dataclass
class _Entry:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0  # holders and waiters; the entry is dropped when the last one leaves


class LoraLocks:
    """One asyncio lock per lora_id in this process, plus the store's lock when the engine has a store, so two API
    processes sharing an adapter root never interleave updates of one adapter."""

    def __init__(self) -> None:
        self._locks: dict[str, _Entry] = {}

    def __len__(self) -> int:
        """Adapters someone holds or waits for now."""
        return len(self._locks)

    @contextlib.asynccontextmanager
    async def hold(self, lora_id: str, timeout_s: float, engine: TrainingEngine) -> AsyncGenerator[None]:
        entry = self._locks.setdefault(lora_id, _Entry())
        entry.users += 1
        started = time.monotonic()
        try:
            try:
                await asyncio.wait_for(entry.lock.acquire(), timeout=timeout_s)
            except TimeoutError:
                raise ConflictError(
                    f"adapter {lora_id!r} is busy with another update; "
                    f"waited {timeout_s:.0f}s (CLAAS_FEEDBACK_LOCK_TIMEOUT_S)"
                ) from None
            try:
                store = getattr(engine, "store", None)
                if store is None:
                    yield
                    return
                async with _store_lock(store, lora_id, deadline=started + timeout_s) as hold:
                    # This request's writes (on the engine's worker) skip the held lock; other threads wait. Stores
                    # other than LoraStore (the Tinker state) yield no hold and order their writes themselves.
                    with hold.authorize() if isinstance(hold, LockHold) else contextlib.nullcontext():
                        yield
            finally:
                entry.lock.release()
        finally:
            entry.users -= 1
            if entry.users == 0:
                self._locks.pop(lora_id, None)


@contextlib.asynccontextmanager
async def _store_lock(store: Any, lora_id: str, *, deadline: float) -> AsyncGenerator[Any]:
    """The store's lock, by non-blocking attempts until `deadline` (each attempt is a flock call: no thread)."""
    while True:
        manager = store.lock(lora_id, 0)
        try:
            hold = manager.__enter__()
            break
        except LoraLockTimeoutError:
            if time.monotonic() >= deadline:
                raise ConflictError(f"adapter {lora_id!r} is being updated by another CLaaS process") from None
        await asyncio.sleep(LOCK_POLL_S)
    try:
        yield hold
    finally:
        manager.__exit__(None, None, None)


def lora_locks(state: Any) -> LoraLocks:
    """The app's one LoraLocks (on `app.state`), shared by feedback, distill, init and delete."""
    if getattr(state, "lora_locks", None) is None:
        state.lora_locks = LoraLocks()
    return state.lora_locks
