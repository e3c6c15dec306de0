"""LoraLocks and the store's lock map (issue 8, also-check): waiting for an adapter another writer holds takes no
thread, a wait that runs out is 409, and the lock maps hold only adapters in use."""

from __future__ import annotations

import asyncio
import threading
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from claas.errors import ConflictError
from claas.lora_locks import LoraLocks
from claas.training import storage
from claas.training.storage import LoraStore


class StoreOnly:
    """What LoraLocks needs of an engine: its store."""

    def __init__(self, store: LoraStore) -> None:
        self.store = store


def _hold_in_thread(store: LoraStore, ids: list[str]) -> tuple[threading.Event, threading.Thread]:
    """Another writer (a thread of its own, like another process) holds these adapters' locks until released."""
    held, release = threading.Event(), threading.Event()

    def run() -> None:
        with ExitStack() as stack:
            for lora_id in ids:
                stack.enter_context(store.lock(lora_id, timeout=5))
            held.set()
            release.wait(30)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert held.wait(10)
    return release, thread


def test_waiting_for_held_adapters_leaves_the_thread_pool_free(tmp_path: Path) -> None:
    """More requests wait for locks than the default pool has threads (min(32, cpus + 4)); list/export/exists run
    on that pool and must still answer while they wait. The old code blocked one pool thread per waiter."""
    store = LoraStore(tmp_path / "loras")
    ids = [f"busy/a{index}" for index in range(40)]
    release, thread = _hold_in_thread(store, ids)
    engine: Any = StoreOnly(store)
    locks = LoraLocks()

    async def wait_for(lora_id: str) -> None:
        async with locks.hold(lora_id, timeout_s=20, engine=engine):
            pass

    async def scenario() -> str:
        waiters = [asyncio.create_task(wait_for(lora_id)) for lora_id in ids]
        await asyncio.sleep(0.3)  # every waiter is waiting now
        assert not any(task.done() for task in waiters)
        try:
            # What list/export do: a short call on the default pool, while all 40 still wait.
            return await asyncio.wait_for(asyncio.to_thread(lambda: "listed"), timeout=10)
        finally:
            release.set()
            await asyncio.gather(*waiters)

    assert asyncio.run(scenario()) == "listed"
    thread.join(5)
    assert len(locks) == 0  # and the map forgot them once they were done


def test_a_lock_wait_that_runs_out_is_409(tmp_path: Path) -> None:
    store = LoraStore(tmp_path / "loras")
    release, thread = _hold_in_thread(store, ["busy/x"])
    engine: Any = StoreOnly(store)

    async def scenario() -> None:
        async with LoraLocks().hold("busy/x", timeout_s=0.3, engine=engine):
            pass

    with pytest.raises(ConflictError, match="another CLaaS process"):
        asyncio.run(scenario())
    release.set()
    thread.join(5)


def test_lock_maps_hold_only_adapters_in_use(tmp_path: Path) -> None:
    """After 50 adapters were each locked and released, neither LoraLocks nor the store's process-wide map keeps
    an entry for them (the old maps grew with every adapter ever locked)."""
    store = LoraStore(tmp_path / "loras")
    engine: Any = StoreOnly(store)
    locks = LoraLocks()
    before = set(storage._LOCKS)

    async def scenario() -> None:
        for index in range(50):
            async with locks.hold(f"many/a{index}", timeout_s=5, engine=engine):
                assert len(locks) == 1
            with store.lock(f"other/b{index}", timeout=5):
                pass

    asyncio.run(scenario())
    assert len(locks) == 0
    assert set(storage._LOCKS) == before
