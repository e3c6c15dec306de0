"""SleepCoordinator: one per inference server (one per API app), so that sleep and wake follow the steps that need
the accelerator, not whichever feedback happens to finish first.

The first training step that needs the device stops admitting inference requests, lets the admitted ones reach the
server and finish (the drain: requests already on their way are counted here, so none arrives at a server that has
just fallen asleep), and puts it to sleep; later steps join (a reference count); the server is woken when the last
one ends. Inference requests that arrive meanwhile wait (bounded by CLAAS_SLEEP_WAIT_TIMEOUT_S) and are served after
the wake, or get 503 with `Retry-After` when the wait runs out. A sleep call that fails or times out still ends with
a wake attempt: the server may have fallen asleep even though the call did not return.

Not here: other API processes sharing the server (each has its own coordinator), choosing whether to sleep (the
feedback transaction decides), the HTTP client (passed in by the caller, so tests can record its calls).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncGenerator

from claas.errors import ClaasError, UpstreamTimeoutError, UpstreamUnavailableError
from claas.inference.base import InferenceBackend

logger = logging.getLogger(__name__)


class ServerSleepingError(UpstreamUnavailableError):
    """The inference server is asleep for a training step and did not wake within the wait (503 + Retry-After)."""

    def __init__(self, message: str, *, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(max(1, math.ceil(self.retry_after_s)))}


class SleepCoordinator:
    def __init__(self) -> None:
        self._holders = 0
        self._lock = asyncio.Lock()  # one sleep or wake transition at a time
        self._awake = asyncio.Event()
        self._awake.set()
        self._in_transit = 0  # admitted requests the server may not count yet (on their way, or opening a stream)
        self._settled = asyncio.Event()
        self._settled.set()

    @property
    def holders(self) -> int:
        return self._holders

    @property
    def sleeping(self) -> bool:
        """True from the moment the first step stops admitting requests until the last one has woken the server."""
        return not self._awake.is_set()

    async def acquire(self, inference: InferenceBackend, *, level: int, drain_timeout_s: float) -> None:
        """Register a step that needs the device. The first one drains the server and puts it to sleep; on failure
        the registration is undone and the server woken (it may be asleep even if the call timed out)."""
        async with self._lock:
            self._holders += 1
            if self._holders > 1:
                return
            self._awake.clear()  # admit no new requests, so the drain can finish under steady traffic
            try:
                deadline = time.monotonic() + drain_timeout_s
                await self._wait_settled(drain_timeout_s)
                await inference.wait_until_idle(max(0.0, deadline - time.monotonic()))
                await inference.sleep(level)
            except BaseException:
                self._holders -= 1
                await self._wake(inference, reason="the sleep call failed")
                raise

    async def release(self, inference: InferenceBackend, *, wake: bool = True) -> bool:
        """Unregister a step; the last one wakes the server (unless `wake` is False: an admin asked to leave it
        asleep). True when this call woke it."""
        async with self._lock:
            self._holders -= 1
            if self._holders > 0 or not wake:
                return False
            await self._wake(inference, reason=None)
            return True

    @contextlib.asynccontextmanager
    async def admitted(self, timeout_s: float) -> AsyncGenerator[None]:
        """Admit one inference request: wait while a step holds the server asleep (see `wait_awake`), then count it
        as in transit for the block, so a step that starts meanwhile waits for it to reach the server before it
        polls the server's own counts. Hold it until the server has the request (the whole call, or a stream's
        first chunk): from then on the server reports it as running."""
        await self.wait_awake(timeout_s)
        self._in_transit += 1
        self._settled.clear()
        try:
            yield
        finally:
            self._in_transit -= 1
            if self._in_transit == 0:
                self._settled.set()

    async def _wait_settled(self, timeout_s: float) -> None:
        try:
            await asyncio.wait_for(self._settled.wait(), timeout=timeout_s)
        except TimeoutError:
            raise UpstreamTimeoutError(
                f"{self._in_transit} admitted inference requests did not reach the server within {timeout_s:g}s"
            ) from None

    async def wait_awake(self, timeout_s: float) -> None:
        """Return at once when no step holds the server asleep, else when the last one has woken it; after
        `timeout_s` raise ServerSleepingError (503, Retry-After)."""
        if self._awake.is_set():
            return
        try:
            await asyncio.wait_for(self._awake.wait(), timeout=timeout_s)
        except TimeoutError:
            raise ServerSleepingError(
                f"the inference server is asleep for a training step; waited {timeout_s:g}s "
                "(CLAAS_SLEEP_WAIT_TIMEOUT_S), retry shortly",
                retry_after_s=max(1.0, timeout_s / 4),
            ) from None

    async def _wake(self, inference: InferenceBackend, *, reason: str | None) -> None:
        try:
            await inference.wake_up()
        except ClaasError as exc:
            if reason is None:
                raise
            logger.warning("could not wake the inference server after %s: %s", reason, exc.message)
        finally:
            # Admit requests again even when the wake failed: they get the server's own answer, not a wait.
            self._awake.set()
