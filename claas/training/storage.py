"""LoraStore: LoRA adapters on a local filesystem, with atomic saves, versions, aliases, export and locks.

Layout under ``root`` (every symlink is relative, so the root can be moved or mounted elsewhere, e.g. ``/loras``)::

    alice/concise                         -> ../.snapshots/alice%2Fconcise/000007-3f2a9c1e
    alice/concise@20261124T201500123456Z  -> ../.snapshots/alice%2Fconcise@20261124T201500123456Z/000001-9b0c4d2a
    alice/concise@latest                  -> concise@20261124T201500123456Z
    .snapshots/<id with / as %2F>/<seq>-<rand>/   adapter_config.json, adapter_model.safetensors,
                                                  optimizer_state.pt, claas_metadata.json
    .locks/<id with / as %2F>.lock

A save builds a complete snapshot directory, fsyncs it, then swaps the public symlink with ``os.replace`` (atomic on
POSIX), so the public path is a complete adapter at every instant, including after a crash. A reader that resolved the
path before a swap keeps a complete snapshot: the previous snapshot survives garbage collection for one more save.

Not here: building adapter weights (the trainer writes them through the ``write`` callback), talking to the inference
server, and Modal volumes (a variant wraps this store with ``commit``/``reload``).
"""

from __future__ import annotations

import builtins
import contextlib
import contextvars
import io
import json
import logging
import os
import re
import shutil
import threading
import time
import uuid
import zipfile
from collections.abc import Callable, Generator, Iterator
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import filelock
import pydantic

from claas.core.lora_ids import (  # the grammar lives in core; re-exported for the store's callers
    LATEST,
    MAX_SEGMENTS,
    VERSION_FORMAT,
    InvalidLoraIdError,
    split_version,
    validate_lora_id,
)

logger = logging.getLogger(__name__)

METADATA_FILE = "claas_metadata.json"
OPTIMIZER_FILE = "optimizer_state.pt"
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
TRAINING_STATE_FILES = frozenset({OPTIMIZER_FILE})  # left out of exports: training state, not the adapter
_TEMP_LINK = re.compile(r"\.(.+)\.[0-9a-f]{8}\.tmp")  # what `_link` names a new link before the swap
STALE_TMP_SECONDS = 3600.0  # a temp snapshot this old is a crash leftover, not a save in progress



class LoraStoreError(Exception):
    """Base class of the store's errors."""


class LoraNotFoundError(LoraStoreError, LookupError):
    """No adapter with this id."""


class LoraExistsError(LoraStoreError):
    """The id is taken (by an adapter, or by a namespace of other adapters)."""


class LoraLockTimeoutError(LoraStoreError, TimeoutError):
    """Another writer held the adapter's lock for longer than the timeout."""


def _utc_now() -> datetime:
    return datetime.now(timezone.utc)


def _utc_now_iso() -> str:
    return _utc_now().isoformat()


@dataclass
class LoraMetadata:
    """The JSON sidecar ``claas_metadata.json``. The store sets lora_id, version_of, created_at and updated_at."""

    lora_id: str
    base_model: str
    rank: int
    alpha: int
    target_modules: list[str]
    step: int = 0
    created_at: str = field(default_factory=_utc_now_iso)
    updated_at: str = field(default_factory=_utc_now_iso)
    version_of: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> LoraMetadata:
        """Parse a sidecar, migrating older formats; unknown keys (from a newer CLaaS) are ignored."""
        raw = json.loads(text)
        if not isinstance(raw, dict):
            raise ValueError(f"metadata must be a JSON object, not {type(raw).__name__}")
        for migrate in _MIGRATIONS:
            raw = migrate(raw)
        known = {f.name for f in fields(cls)}
        if unknown := sorted(set(raw) - known):
            logger.debug("ignoring unknown metadata keys %s", unknown)
        return _METADATA_ADAPTER.validate_python({k: v for k, v in raw.items() if k in known})


def migrate_metadata_without_extra(raw: dict[str, Any]) -> dict[str, Any]:
    """Sidecars written before ``extra`` existed: add it empty."""
    return raw if "extra" in raw else {**raw, "extra": {}}


_MIGRATIONS: tuple[Callable[[dict[str, Any]], dict[str, Any]], ...] = (migrate_metadata_without_extra,)
_METADATA_ADAPTER = pydantic.TypeAdapter(LoraMetadata)


@dataclass
class LoraEntry:
    """One adapter (in-place or versioned) as ``LoraStore.list`` reports it."""

    lora_id: str
    metadata: LoraMetadata
    aliases: list[str] = field(default_factory=list)  # alias ids pointing here, e.g. "user/x@latest"


@dataclass(eq=False)
class LockHold:
    """One holding of an adapter's lock (what ``LoraStore.lock`` yields). Writes of that adapter skip the lock only
    in a context that this hold authorizes: the thread that entered the lock, and any context inside
    ``authorize()`` (and copies of it, e.g. a worker thread given ``contextvars.copy_context()``). Any other
    thread of the process waits for the lock like another process would."""

    base: str

    @contextlib.contextmanager
    def authorize(self) -> Generator[None, None, None]:
        token = _AUTHORIZED.set(_AUTHORIZED.get() | {self})
        try:
            yield
        finally:
            _AUTHORIZED.reset(token)


# The lock holds the current context may write under (see LockHold).
_AUTHORIZED: contextvars.ContextVar[frozenset[LockHold]] = contextvars.ContextVar(
    "claas_lora_lock_holds", default=frozenset()
)


@dataclass
class _LockState:
    mutex: threading.Lock
    file_lock: filelock.FileLock
    holder: LockHold | None = None
    users: int = 0  # threads holding or waiting; the state is dropped when the last one leaves (guarded)


# Process-wide on purpose: flock belongs to an open file description, so two FileLock objects on one file in one
# process would block each other; every LoraStore on the same root must share one lock per adapter while anyone
# holds or waits for it. Entries are reference-counted, so the map holds only adapters in use, not every one ever
# locked.
_LOCKS: dict[str, _LockState] = {}
_LOCKS_GUARD = threading.Lock()


class LoraStore:
    """Adapters under ``root``; see the module docstring for the layout and the guarantees."""

    def __init__(
        self, root: Path, *, lock_timeout: float = 60.0, superseded_grace_s: float = 120.0, recover: bool = True
    ) -> None:
        self.root = Path(root).absolute()
        self.lock_timeout = lock_timeout  # how long create/save/delete wait for a lock nobody in this process holds
        # A superseded snapshot outlives its replacement by this long, so a reader that resolved the link before
        # a burst of saves (an export being zipped, an inference server loading the adapter) can finish.
        self.superseded_grace_s = superseded_grace_s
        self.root.mkdir(parents=True, exist_ok=True)
        if recover:
            self.recover()

    # ------------------------------------------------------------------ reading
    def adapter_path(self, lora_id: str) -> Path:
        """The stable public path ``<root>/<lora_id>`` that PEFT or vLLM loads (versioned ids and aliases too)."""
        self.snapshot_path(lora_id)
        return self._public(lora_id)

    def snapshot_path(self, lora_id: str) -> Path:
        """The immutable snapshot the public path points at now: read several files from it for one consistent view."""
        validate_lora_id(lora_id, allow_version=True)
        public = self._public(lora_id)
        parent = public.parent
        while parent != self.root:  # "a/b" must not reach into the snapshot of adapter "a"
            if parent.is_symlink():
                raise LoraNotFoundError(f"no adapter {lora_id!r}: {parent.relative_to(self.root)!s} is an adapter")
            parent = parent.parent
        if not public.is_symlink():
            raise LoraNotFoundError(f"no adapter {lora_id!r}")
        snapshot = Path(os.path.realpath(public))
        snapshots_root = Path(os.path.realpath(self.root / ".snapshots"))
        if snapshots_root not in snapshot.parents or not (snapshot / METADATA_FILE).is_file():
            raise LoraNotFoundError(f"no adapter {lora_id!r} (its link is dangling or points outside the store)")
        return snapshot

    def exists(self, lora_id: str) -> bool:
        try:
            self.snapshot_path(lora_id)
        except LoraNotFoundError:
            return False
        return True

    def read_metadata(self, lora_id: str) -> LoraMetadata:
        path = self.snapshot_path(lora_id) / METADATA_FILE
        try:
            return LoraMetadata.from_json(path.read_text())
        except FileNotFoundError as e:  # garbage-collected between resolving and reading: it was just replaced
            raise LoraNotFoundError(f"no adapter {lora_id!r}") from e
        except ValueError as e:
            raise LoraStoreError(f"corrupt metadata for adapter {lora_id!r} in {path}: {e}") from e

    def list(self, prefix: str = "") -> builtins.list[LoraEntry]:
        """Adapters whose id starts with ``prefix`` (a plain string prefix), sorted by id, versions included."""
        entries: dict[str, LoraEntry] = {}
        aliases: builtins.list[tuple[str, str]] = []
        for lora_id in self._walk(self.root, ()):
            if not lora_id.startswith(prefix):
                continue
            base, version = split_version(lora_id)
            if version == LATEST:
                try:
                    target = os.readlink(self._public(lora_id))
                except OSError:  # deleted while we walked
                    continue
                aliases.append((lora_id, f"{base.rpartition('/')[0]}/{target}".lstrip("/")))
                continue
            with contextlib.suppress(LoraNotFoundError):  # dangling, or deleted while we walked
                entries[lora_id] = LoraEntry(lora_id, self.read_metadata(lora_id), [])
        for alias, target in aliases:
            if target in entries:
                entries[target].aliases.append(alias)
        return [entries[k] for k in sorted(entries)]

    def export_zip(self, lora_id: str) -> bytes:
        """A zip of the adapter files at the archive root (loadable by PEFT/vLLM once unzipped), no optimizer state."""
        snapshot = self.snapshot_path(lora_id)
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            for path in sorted(p for p in snapshot.rglob("*") if p.is_file()):
                name = path.relative_to(snapshot).as_posix()
                if name not in TRAINING_STATE_FILES:
                    archive.write(path, name)
        return buffer.getvalue()

    # ------------------------------------------------------------------ writing
    def create(self, lora_id: str, write: Callable[[Path], None], metadata: LoraMetadata) -> Path:
        """A new adapter; ``write`` fills an empty directory with the PEFT files (+ optimizer state)."""
        validate_lora_id(lora_id)
        with self._writing(lora_id):
            if self.exists(lora_id):
                raise LoraExistsError(f"adapter {lora_id!r} already exists")
            self._claim_public_path(lora_id)
            now = _utc_now_iso()
            meta = replace(metadata, lora_id=lora_id, version_of=None, created_at=now, updated_at=now)
            return self._commit(lora_id, write, meta)

    def save(self, lora_id: str, write: Callable[[Path], None], metadata: LoraMetadata) -> Path:
        """Replace an existing adapter in place, atomically; created_at is kept, updated_at is now."""
        validate_lora_id(lora_id)
        with self._writing(lora_id):
            created_at = self.read_metadata(lora_id).created_at
            meta = replace(metadata, lora_id=lora_id, version_of=None, created_at=created_at, updated_at=_utc_now_iso())
            return self._commit(lora_id, write, meta)

    def save_version(self, lora_id: str, write: Callable[[Path], None], metadata: LoraMetadata) -> str:
        """A new checkpoint ``<lora_id>@<UTC timestamp>`` plus the alias ``<lora_id>@latest``; returns its id.

        The in-place adapter ``lora_id`` (which must exist) is left untouched.
        """
        validate_lora_id(lora_id)
        with self._writing(lora_id):
            self.snapshot_path(lora_id)
            stamp = _utc_now()
            while self._public(version_id := f"{lora_id}@{stamp.strftime(VERSION_FORMAT)}").is_symlink():
                stamp += timedelta(microseconds=1)
            now = stamp.isoformat()
            meta = replace(metadata, lora_id=version_id, version_of=lora_id, created_at=now, updated_at=now)
            self._commit(version_id, write, meta)
            self._link(self._public(f"{lora_id}@{LATEST}"), self._public(version_id))
            return version_id

    def delete(self, lora_id: str) -> None:
        """Delete an adapter with all its versions, or (for ``id@<timestamp>``) that one version only."""
        validate_lora_id(lora_id, allow_version=True)
        base, version = split_version(lora_id)
        if version == LATEST:
            target = os.readlink(self._public(lora_id)) if self._public(lora_id).is_symlink() else "nothing"
            raise InvalidLoraIdError(f"{lora_id!r} is an alias (of {target!r}); delete the version itself")
        with self._writing(base):
            if version is not None:
                self._delete_version(lora_id)
                return
            versions = self._version_ids(base)
            if not self.exists(base) and not versions:
                raise LoraNotFoundError(f"no adapter {lora_id!r}")
            # Links first (aliases before their targets), so no reader finds a link to a missing snapshot.
            for name in [f"{base}@{LATEST}", *versions, base]:
                self._public(name).unlink(missing_ok=True)
            for name in [*versions, base]:
                shutil.rmtree(self._snapshots(name), ignore_errors=True)
            self._prune_namespaces(self._public(base).parent)

    def lock(self, lora_id: str, timeout: float) -> contextlib.AbstractContextManager[LockHold]:
        """Inter-process lock on one adapter (a version locks its adapter); LoraLockTimeoutError after ``timeout`` s.

        Not reentrant. It yields a ``LockHold``: create/save/save_version/delete of that adapter run without taking
        the lock again in the context that entered it and in contexts the hold authorizes (e.g. the feedback
        transaction authorizes its task, and the engine's worker thread runs the save in a copy of that context);
        from any other thread they wait for the lock.
        """
        base, _ = split_version(validate_lora_id(lora_id, allow_version=True))
        return self._acquire(base, timeout, by_caller=True)

    def recover(self) -> int:
        """Remove what saves killed midway left behind: temp snapshot dirs, snapshots that were never linked (a
        crash between the rename and the link swap) and temp links. Only for adapters whose lock is free at once
        (a live writer's work in progress is left alone). Runs at start (``recover=True``); returns the number of
        leftovers removed. The public links need no repair: a crash leaves each at the old or the new snapshot."""
        removed = 0
        snapshots_root = self.root / ".snapshots"
        if snapshots_root.is_dir():
            for snapshots in sorted(snapshots_root.iterdir()):
                lora_id = snapshots.name.replace("%2F", "/")
                removed += self._recover_one(lora_id, lambda: self._snapshot_leftovers(lora_id, snapshots))
        for link in self._temp_links(self.root, ()):
            lora_id = link[1]
            removed += self._recover_one(lora_id, lambda: [link[0]] if link[0].is_symlink() else [])
        if removed:
            logger.info("removed %d leftovers of interrupted saves under %s", removed, self.root)
        return removed

    def _recover_one(self, lora_id: str, leftovers: Callable[[], builtins.list[Path]]) -> int:
        try:
            base, _ = split_version(validate_lora_id(lora_id, allow_version=True))
        except InvalidLoraIdError:
            return 0
        try:
            with self._acquire(base, 0, by_caller=False):
                doomed = leftovers()
                for path in doomed:
                    if path.is_symlink() or not path.is_dir():
                        path.unlink(missing_ok=True)
                    else:
                        shutil.rmtree(path, ignore_errors=True)
                return len(doomed)
        except LoraLockTimeoutError:  # a writer is at work on it now
            return 0

    def _snapshot_leftovers(self, lora_id: str, snapshots: Path) -> builtins.list[Path]:
        public = self._public(lora_id)
        current = Path(os.path.realpath(public)) if public.is_symlink() else None
        linked = current.name if current is not None and current.parent == snapshots else None
        linked_seq = int(linked.split("-")[0]) if linked is not None else 0
        doomed = []
        for child in snapshots.iterdir():
            if child.name.startswith(".tmp-"):
                doomed.append(child)
            elif child.name[:1].isdigit() and child.name != linked and int(child.name.split("-")[0]) > linked_seq:
                doomed.append(child)  # renamed into place, never linked: the save did not happen
        if linked is None and len(doomed) == sum(1 for _ in snapshots.iterdir()):
            doomed.append(snapshots)  # an adapter whose creation never completed: nothing of it is left
        return doomed

    def _temp_links(self, directory: Path, segments: tuple[str, ...]) -> Iterator[tuple[Path, str]]:
        """Temp links (``.<name>.<hex8>.tmp``) that a link swap killed midway left, with the id they were for."""
        for entry in os.scandir(directory):
            if entry.name in (".snapshots", ".locks"):
                continue
            match = _TEMP_LINK.fullmatch(entry.name)
            if match is not None and entry.is_symlink():
                yield Path(entry.path), "/".join((*segments, match.group(1)))
            elif entry.is_dir(follow_symlinks=False) and not entry.name.startswith("."):
                if len(segments) + 1 < MAX_SEGMENTS:
                    yield from self._temp_links(Path(entry.path), (*segments, entry.name))

    # ------------------------------------------------------------------ internals
    def _public(self, lora_id: str) -> Path:
        return self.root.joinpath(*lora_id.split("/"))

    def _snapshots(self, lora_id: str) -> Path:
        return self.root / ".snapshots" / lora_id.replace("/", "%2F")

    def _version_ids(self, base: str) -> builtins.list[str]:
        public = self._public(base)
        if not public.parent.is_dir() or public.parent.is_symlink():
            return []
        head = base.rpartition("/")[0]
        names = (p.name for p in public.parent.iterdir() if p.name.startswith(f"{public.name}@"))
        return sorted(f"{head}/{n}".lstrip("/") for n in names if split_version(n)[1] not in (None, LATEST))

    def _walk(self, directory: Path, segments: tuple[str, ...]) -> Iterator[str]:
        for entry in sorted(os.scandir(directory), key=lambda e: e.name):
            if entry.name.startswith("."):  # .snapshots, .locks, temp links: ids never start with '.'
                continue
            lora_id = "/".join((*segments, entry.name))
            if entry.is_symlink():
                try:
                    yield validate_lora_id(lora_id, allow_version=True)
                except InvalidLoraIdError:
                    logger.warning("ignoring %s in the LoRA root: not a valid lora_id", entry.path)
            elif entry.is_dir() and len(segments) + 1 < MAX_SEGMENTS:
                yield from self._walk(Path(entry.path), (*segments, entry.name))

    def _claim_public_path(self, lora_id: str) -> None:
        """Refuse an id that clashes with a namespace: "a/b" needs "a" not to be an adapter, and vice versa."""
        public = self._public(lora_id)
        for parent in reversed(public.parents):
            if parent == self.root or not parent.is_relative_to(self.root):
                continue
            if parent.is_symlink() or (parent.exists() and not parent.is_dir()):
                taken = parent.relative_to(self.root).as_posix()
                raise LoraExistsError(f"cannot create {lora_id!r}: {taken!r} is an adapter, not a namespace")
        if public.is_dir() and not public.is_symlink():
            with contextlib.suppress(OSError):
                public.rmdir()  # an empty namespace left behind is free to take
            if public.exists():
                raise LoraExistsError(f"cannot create {lora_id!r}: it is a namespace holding other adapters")

    def _commit(self, lora_id: str, write: Callable[[Path], None], metadata: LoraMetadata) -> Path:
        """Build a complete snapshot, fsync it, swap the public link to it, and garbage-collect old snapshots."""
        snapshots = self._snapshots(lora_id)
        _mkdirs(snapshots)
        tmp = snapshots / f".tmp-{uuid.uuid4().hex}"
        tmp.mkdir()
        try:
            write(tmp)
            if not (tmp / ADAPTER_CONFIG_FILE).is_file() or not any((tmp / f).is_file() for f in ADAPTER_WEIGHT_FILES):
                raise LoraStoreError(
                    f"the writer for {lora_id!r} did not produce a PEFT adapter "
                    f"({ADAPTER_CONFIG_FILE} and one of {', '.join(ADAPTER_WEIGHT_FILES)})"
                )
            (tmp / METADATA_FILE).write_text(metadata.to_json())
            _fsync_tree(tmp)
            snapshot = snapshots / f"{_next_sequence(snapshots):06d}-{uuid.uuid4().hex[:8]}"
            tmp.rename(snapshot)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _fsync_dir(snapshots)
        public = self._public(lora_id)
        previous = Path(os.path.realpath(public)) if public.is_symlink() else None
        try:
            self._link(public, snapshot)
        except BaseException:
            shutil.rmtree(snapshot, ignore_errors=True)
            raise
        if previous is not None and previous.parent == snapshots:
            os.utime(previous)  # its mtime now says when it was superseded (the grace period counts from here)
        _collect_garbage(snapshots, current=snapshot, previous=previous, grace_s=self.superseded_grace_s)
        return public

    def _link(self, public: Path, target: Path) -> None:
        """Point ``public`` at ``target`` with a relative symlink, atomically (a new link renamed over the old)."""
        _mkdirs(public.parent)
        tmp_link = public.parent / f".{public.name}.{uuid.uuid4().hex[:8]}.tmp"
        os.symlink(os.path.relpath(target, public.parent), tmp_link)
        try:
            os.replace(tmp_link, public)
        except BaseException:
            tmp_link.unlink(missing_ok=True)
            raise
        _fsync_dir(public.parent)

    def _delete_version(self, version_id: str) -> None:
        base, _ = split_version(version_id)
        if not self._public(version_id).is_symlink():
            raise LoraNotFoundError(f"no adapter {version_id!r}")
        alias = self._public(f"{base}@{LATEST}")
        if alias.is_symlink() and os.readlink(alias) == self._public(version_id).name:
            remaining = [v for v in self._version_ids(base) if v != version_id]
            if remaining:  # timestamps sort chronologically
                self._link(alias, self._public(remaining[-1]))
            else:
                alias.unlink()
        self._public(version_id).unlink()
        shutil.rmtree(self._snapshots(version_id), ignore_errors=True)

    def _prune_namespaces(self, directory: Path) -> None:
        while directory != self.root and directory.is_relative_to(self.root):
            try:
                directory.rmdir()  # only succeeds while empty
            except OSError:
                return
            directory = directory.parent

    @contextlib.contextmanager
    def _writing(self, lora_id: str) -> Generator[None, None, None]:
        base, _ = split_version(lora_id)
        with _LOCKS_GUARD:
            state = _LOCKS.get(os.path.realpath(self._lock_file(base)))
            holder = state.holder if state is not None else None
        if holder is not None and holder in _AUTHORIZED.get():
            yield
            return
        with self._acquire(base, self.lock_timeout, by_caller=False):
            yield

    def _lock_file(self, base: str) -> Path:
        locks = self.root / ".locks"
        locks.mkdir(exist_ok=True)
        return locks / (base.replace("/", "%2F") + ".lock")

    @contextlib.contextmanager
    def _acquire(self, base: str, timeout: float, *, by_caller: bool) -> Generator[LockHold, None, None]:
        # The mutex orders threads of this process; the file lock orders processes. A plain Lock (not RLock) and a
        # non-thread-local FileLock, so a holder may release from another thread (asyncio.to_thread).
        with _lock_state(self._lock_file(base)) as state:
            started = time.monotonic()
            if not state.mutex.acquire(timeout=timeout if timeout >= 0 else -1):
                raise LoraLockTimeoutError(
                    f"adapter {base!r} is locked by another writer; gave up after {timeout:g} s"
                )
            try:
                state.file_lock.acquire(
                    timeout=max(0.0, timeout - (time.monotonic() - started)) if timeout >= 0 else -1
                )
            except filelock.Timeout as e:
                state.mutex.release()
                raise LoraLockTimeoutError(
                    f"adapter {base!r} is locked by another process; gave up after {timeout:g} s"
                ) from e
            except BaseException:
                state.mutex.release()
                raise
            with self._held(state, base, by_caller=by_caller) as hold:
                yield hold

    @staticmethod
    @contextlib.contextmanager
    def _held(state: _LockState, base: str, *, by_caller: bool) -> Generator[LockHold, None, None]:
        """The body of a held lock (mutex and file lock taken): record the holder, release both at the end."""
        hold = LockHold(base)
        if by_caller:
            state.holder = hold
            # The entering context may write at once (a plain `with store.lock(x): store.save(x, ...)`). Set, not
            # reset by token: the exit may run in another context (asyncio.to_thread enters and exits).
            _AUTHORIZED.set(_AUTHORIZED.get() | {hold})
        try:
            yield hold
        finally:
            if by_caller:
                state.holder = None
                _AUTHORIZED.set(_AUTHORIZED.get() - {hold})
            state.file_lock.release()
            state.mutex.release()


@contextlib.contextmanager
def _lock_state(path: Path) -> Generator[_LockState, None, None]:
    """The process-wide lock state of one lock file, counted as in use for the length of the block."""
    key = os.path.realpath(path)
    with _LOCKS_GUARD:
        state = _LOCKS.get(key)
        if state is None:
            state = _LOCKS[key] = _LockState(threading.Lock(), filelock.FileLock(key, thread_local=False))
        state.users += 1
    try:
        yield state
    finally:
        with _LOCKS_GUARD:
            state.users -= 1
            if state.users == 0:
                del _LOCKS[key]


def _next_sequence(snapshots: Path) -> int:
    numbers = [int(p.name.split("-")[0]) for p in snapshots.iterdir() if p.name[:1].isdigit()]
    return max(numbers, default=0) + 1


def _collect_garbage(snapshots: Path, *, current: Path, previous: Path | None, grace_s: float) -> None:
    """Keep the current snapshot and the previous one; drop older ones superseded more than `grace_s` ago (a slow
    reader may still be loading them).

    Snapshots numbered above the current one are left alone (a writer that does not hold the lock may be about to
    link one), and so are temp dirs younger than STALE_TMP_SECONDS.
    """
    keep = {current.name} | ({previous.name} if previous is not None and previous.parent == snapshots else set())
    current_seq = int(current.name.split("-")[0])
    for child in snapshots.iterdir():
        if child.name in keep:
            continue
        if child.name.startswith(".tmp-"):
            stale = time.time() - child.stat().st_mtime > STALE_TMP_SECONDS
        else:
            superseded_long_ago = time.time() - child.stat().st_mtime > grace_s
            stale = child.name[:1].isdigit() and int(child.name.split("-")[0]) < current_seq and superseded_long_ago
        if stale:
            shutil.rmtree(child, ignore_errors=True)


def _mkdirs(directory: Path) -> None:
    """``mkdir -p`` that fsyncs the parent of each directory it makes, so a crash cannot lose a linked-to one."""
    if directory.is_dir():
        return
    _mkdirs(directory.parent)
    with contextlib.suppress(FileExistsError):
        directory.mkdir()
    _fsync_dir(directory.parent)


def _fsync_tree(directory: Path) -> None:
    for dirpath, _, filenames in os.walk(directory, topdown=False):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
