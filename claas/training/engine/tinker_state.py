"""TinkerState: the JSON file that maps lora_id -> Tinker checkpoint paths and step (the tinker engine's store).

Tinker keeps the weights; this file says which checkpoint is each adapter's current one. Every change is a
read-modify-write under an inter-process file lock on the state file, written to a temp file, fsynced and renamed
over the old one, so a crash leaves either the old or the new map and two API replicas sharing the file (a shared
volume) never lose each other's entries. `lock(lora_id)` is the per-adapter lock the feedback transaction holds for
a whole step, so two replicas never step one adapter from the same checkpoint.

Not here: talking to Tinker (claas.training.engine.tinker).
"""

from __future__ import annotations

import builtins
import contextlib
import json
import os
from collections.abc import Callable, Generator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TypeVar

import filelock

from claas.training.storage import LoraLockTimeoutError, LoraNotFoundError, split_version, validate_lora_id

STATE_FILE = "tinker_state.json"
T = TypeVar("T")


def utc_now_iso() -> str:
    return datetime.now(timezone.utc).isoformat()


@dataclass
class TinkerLora:
    lora_id: str
    base_model: str
    rank: int
    step: int
    state_path: str  # tinker://<run>/weights/<name>: weights + optimizer state, what the next step resumes from
    sampler_path: str  # tinker://<run>/sampler_weights/<name>: what the sampler serves
    created_at: str = field(default_factory=utc_now_iso)
    updated_at: str = field(default_factory=utc_now_iso)
    version_of: str | None = None
    checkpoints: list[str] = field(default_factory=list)  # every path ever saved for it (deleted with it)


class TinkerState:
    def __init__(self, root: Path, *, lock_timeout: float = 60.0) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.path = self.root / STATE_FILE
        self.lock_timeout = lock_timeout
        self._locks = self.root / ".locks"
        self._locks.mkdir(exist_ok=True)
        self._file_lock = filelock.FileLock(str(self._locks / f"{STATE_FILE}.lock"), thread_local=False)
        self._lora_locks: dict[str, filelock.FileLock] = {}

    # ------------------------------------------------------------------ reading
    def all(self) -> dict[str, TinkerLora]:
        try:
            raw = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        return {lora_id: TinkerLora(**entry) for lora_id, entry in raw.get("loras", {}).items()}

    def get(self, lora_id: str) -> TinkerLora:
        validate_lora_id(lora_id, allow_version=True)
        entry = self.all().get(lora_id)
        if entry is None:
            raise LoraNotFoundError(f"no adapter {lora_id!r}")
        return entry

    def exists(self, lora_id: str) -> bool:
        validate_lora_id(lora_id, allow_version=True)
        return lora_id in self.all()

    def list(self, prefix: str = "") -> builtins.list[TinkerLora]:
        return [entry for lora_id, entry in sorted(self.all().items()) if lora_id.startswith(prefix)]

    # ------------------------------------------------------------------ writing
    def update(self, change: Callable[[dict[str, TinkerLora]], T]) -> T:
        """Apply `change` to the whole map under the state file's lock and write the result atomically."""
        try:
            self._file_lock.acquire(timeout=self.lock_timeout)
        except filelock.Timeout as e:
            raise LoraLockTimeoutError(
                f"tinker state {self.path} is locked; gave up after {self.lock_timeout:g} s"
            ) from e
        try:
            entries = self.all()
            result = change(entries)
            body = {"version": 1, "loras": {k: asdict(v) for k, v in sorted(entries.items())}}
            tmp = self.path.with_name(f".{STATE_FILE}.{os.getpid()}.tmp")
            with tmp.open("w") as handle:
                json.dump(body, handle, indent=2)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.path)
            return result
        finally:
            self._file_lock.release()

    @contextlib.contextmanager
    def _held(self, lora_id: str, timeout: float) -> Generator[None, None, None]:
        base, _ = split_version(validate_lora_id(lora_id, allow_version=True))
        lock = self._lora_locks.setdefault(
            base, filelock.FileLock(str(self._locks / (base.replace("/", "%2F") + ".lock")), thread_local=False)
        )
        try:
            lock.acquire(timeout=timeout)
        except filelock.Timeout as e:
            raise LoraLockTimeoutError(
                f"adapter {base!r} is locked by another writer; gave up after {timeout:g} s"
            ) from e
        try:
            yield
        finally:
            lock.release()

    def lock(self, lora_id: str, timeout: float) -> contextlib.AbstractContextManager[None]:
        """Inter-process lock on one adapter for the length of a step (LoraLockTimeoutError after `timeout` s)."""
        return self._held(lora_id, timeout)
