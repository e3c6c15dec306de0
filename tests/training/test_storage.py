"""LoraStore: id grammar, layout, atomic saves under a concurrent reader, versions, export, locks, garbage collection.

Adapters here are fake files (no torch): a ``write`` callback puts a config and weights that both carry a counter.
"""

from __future__ import annotations

import contextvars
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from claas.training.storage import (
    METADATA_FILE,
    OPTIMIZER_FILE,
    InvalidLoraIdError,
    LoraExistsError,
    LoraLockTimeoutError,
    LoraMetadata,
    LoraNotFoundError,
    LoraStore,
    LoraStoreError,
    migrate_metadata_without_extra,
    validate_lora_id,
)

REPO = Path(__file__).resolve().parents[2]
CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"


def writer(counter: int, weight_bytes: int = 4096) -> Callable[[Path], None]:
    """A fake PEFT save: config and weights that name the same counter, plus optimizer state."""

    def write(directory: Path) -> None:
        assert list(directory.iterdir()) == [], "the store must hand the writer an empty directory"
        (directory / CONFIG).write_text(json.dumps({"r": 8, "counter": counter}))
        (directory / WEIGHTS).write_bytes(f"{counter:08d}".encode() * (weight_bytes // 8))
        (directory / OPTIMIZER_FILE).write_bytes(b"optimizer-%d" % counter)

    return write


def meta(lora_id: str, step: int = 0) -> LoraMetadata:
    return LoraMetadata(
        lora_id=lora_id, base_model="smollm2-135m", rank=8, alpha=16, target_modules=["q_proj"], step=step
    )


def counters(directory: Path) -> tuple[int, int]:
    config = json.loads((directory / CONFIG).read_text())["counter"]
    weights = (directory / WEIGHTS).read_bytes()
    assert weights == weights[:8] * (len(weights) // 8), "weights file is torn"
    return config, int(weights[:8])


def tree_digest(root: Path) -> dict[str, str]:
    """Every file and link under root (links by target), for byte-identity checks."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_symlink():
            out[rel] = "-> " + os.readlink(path)
        elif path.is_file() and not rel.startswith(".locks"):
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


@pytest.fixture
def store(tmp_path: Path) -> LoraStore:
    return LoraStore(tmp_path / "loras", lock_timeout=5.0)


# ---------------------------------------------------------------------- grammar
@pytest.mark.parametrize(
    "lora_id", ["alice", "alice/concise", "a/b/c/d", "user_1/my-lora.v2", "A9", "x" * 128, "a.b/c-d_e"]
)
def test_valid_ids(lora_id: str) -> None:
    assert validate_lora_id(lora_id) == lora_id


@pytest.mark.parametrize("lora_id", ["alice/x@20261124T201500123456Z", "alice/x@latest", "x@latest"])
def test_versioned_ids_need_allow_version(lora_id: str) -> None:
    assert validate_lora_id(lora_id, allow_version=True) == lora_id
    with pytest.raises(InvalidLoraIdError, match="names a version"):
        validate_lora_id(lora_id)


@pytest.mark.parametrize(
    ("lora_id", "problem"),
    [
        ("", "is empty"),
        ("../etc", r"contains '\.\.'"),
        ("a/../b", r"contains '\.\.'"),
        ("a..b", r"contains '\.\.'"),
        ("/abs/path", "absolute path"),
        ("a//b", "empty segment"),
        ("a/", "empty segment"),
        ("a\\b", "backslash"),
        ("a b", "character ' '"),
        ("a/b$c", "character '\\$'"),
        ("caf\u00e9", "character '\u00e9'"),
        ("a\nb", "character '\\\\n'"),
        (".hidden", "must start with a letter or a digit"),
        ("a/-x", "must start with a letter or a digit"),
        ("x" * 129, "129 characters long; at most 128"),
        ("a/b/c/d/e", "5 segments; at most 4"),
        ("a@v1", "must be 'latest' or a UTC timestamp"),
        ("a@latest@latest", "more than one '@'"),
        ("@latest", "nothing before '@'"),
    ],
)
def test_invalid_ids_name_the_problem(lora_id: str, problem: str) -> None:
    with pytest.raises(InvalidLoraIdError, match=problem) as caught:
        validate_lora_id(lora_id, allow_version=True)
    assert isinstance(caught.value, ValueError)


def test_store_methods_validate_ids(store: LoraStore) -> None:
    with pytest.raises(InvalidLoraIdError):
        store.create("../escape", writer(0), meta("../escape"))
    with pytest.raises(InvalidLoraIdError):
        store.exists("/etc")
    with pytest.raises(InvalidLoraIdError):
        store.lock("a//b", timeout=1)
    assert not (store.root.parent / "escape").exists()


# ---------------------------------------------------------------------- metadata
def test_metadata_round_trip_tolerates_unknown_keys_and_migrates() -> None:
    original = meta("u/x", step=3)
    original.extra = {"last_metrics": {"loss": 0.5}}
    assert LoraMetadata.from_json(original.to_json()) == original

    raw = json.loads(original.to_json())
    raw["added_by_a_newer_claas"] = 1
    del raw["extra"]
    loaded = LoraMetadata.from_json(json.dumps(raw))
    assert loaded.extra == {} and loaded.step == 3
    assert migrate_metadata_without_extra({"a": 1}) == {"a": 1, "extra": {}}


def test_corrupt_metadata_is_a_store_error(store: LoraStore) -> None:
    store.create("u/x", writer(0), meta("u/x"))
    (store.snapshot_path("u/x") / METADATA_FILE).write_text('{"lora_id": "u/x", "rank": "many"}')
    with pytest.raises(LoraStoreError, match="corrupt metadata"):
        store.read_metadata("u/x")


# ---------------------------------------------------------------------- create / read / list / delete
def test_create_read_list_delete(store: LoraStore) -> None:
    path = store.create("alice/concise", writer(1), meta("alice/concise"))
    store.create("alice/emoji", writer(2), meta("alice/emoji"))
    store.create("bob", writer(3), meta("bob"))

    assert path == store.root / "alice" / "concise" == store.adapter_path("alice/concise")
    assert counters(path) == (1, 1)
    assert store.exists("alice/concise") and not store.exists("alice/other") and not store.exists("carol")
    got = store.read_metadata("alice/concise")
    assert (got.lora_id, got.rank, got.step, got.version_of) == ("alice/concise", 8, 0, None)
    assert got.created_at == got.updated_at

    assert [e.lora_id for e in store.list()] == ["alice/concise", "alice/emoji", "bob"]
    assert [e.lora_id for e in store.list("alice/")] == ["alice/concise", "alice/emoji"]
    assert store.list("carol") == []

    store.delete("alice/concise")
    assert not store.exists("alice/concise")
    assert not (store.root / ".snapshots" / "alice%2Fconcise").exists()
    store.delete("alice/emoji")
    assert not (store.root / "alice").exists(), "an emptied namespace is removed"
    assert [e.lora_id for e in store.list()] == ["bob"]


def test_create_refuses_existing_ids_and_namespace_clashes(store: LoraStore) -> None:
    store.create("alice/x", writer(1), meta("alice/x"))
    before = tree_digest(store.root)
    with pytest.raises(LoraExistsError, match="already exists"):
        store.create("alice/x", writer(2), meta("alice/x"))
    with pytest.raises(LoraExistsError, match="namespace holding other adapters"):
        store.create("alice", writer(2), meta("alice"))
    with pytest.raises(LoraExistsError, match="'alice/x' is an adapter"):
        store.create("alice/x/deeper", writer(2), meta("alice/x/deeper"))
    assert not store.exists("alice/x/deeper"), "a sub-id must not reach into the snapshot of its parent adapter"
    assert tree_digest(store.root) == before


def test_unknown_adapters_raise_not_found(store: LoraStore) -> None:
    for call in (
        lambda: store.save("nobody/x", writer(1), meta("nobody/x")),
        lambda: store.save_version("nobody/x", writer(1), meta("nobody/x")),
        lambda: store.read_metadata("nobody/x"),
        lambda: store.adapter_path("nobody/x"),
        lambda: store.export_zip("nobody/x"),
        lambda: store.delete("nobody/x"),
        lambda: store.delete("nobody/x@20261124T201500123456Z"),
    ):
        with pytest.raises(LoraNotFoundError, match="nobody/x"):
            call()
    assert isinstance(LoraNotFoundError("x"), LookupError)


def test_save_in_place_keeps_created_at_and_hands_writer_an_empty_dir(store: LoraStore) -> None:
    store.create("u/x", writer(0), meta("u/x"))
    created = store.read_metadata("u/x")
    store.save("u/x", writer(1), meta("u/x", step=1))  # writer() asserts the directory is empty
    saved = store.read_metadata("u/x")
    assert saved.step == 1 and saved.created_at == created.created_at and saved.updated_at > created.updated_at
    assert counters(store.adapter_path("u/x")) == (1, 1)


# ---------------------------------------------------------------------- atomicity
def test_failing_writer_leaves_previous_adapter_byte_identical(store: LoraStore) -> None:
    store.create("u/x", writer(0), meta("u/x"))
    before = tree_digest(store.root)

    def crash(directory: Path) -> None:
        writer(1)(directory)
        raise RuntimeError("trainer died mid-save")

    def config_only(directory: Path) -> None:
        (directory / CONFIG).write_text("{}")

    with pytest.raises(RuntimeError, match="mid-save"):
        store.save("u/x", crash, meta("u/x", step=1))
    with pytest.raises(LoraStoreError, match="did not produce a PEFT adapter"):
        store.save("u/x", config_only, meta("u/x", step=1))
    with pytest.raises(RuntimeError):
        store.save_version("u/x", crash, meta("u/x", step=1))
    with pytest.raises(RuntimeError):
        store.create("u/y", crash, meta("u/y"))

    after = tree_digest(store.root)
    assert {k: v for k, v in after.items() if "u%2Fx@" not in k and "u%2Fy" not in k} == before
    assert not any(".tmp" in k for k in after), "temp snapshots and links are removed"
    assert not store.exists("u/y") and store.list() == store.list("u/x")


def test_reader_never_sees_a_missing_or_partial_adapter_during_50_saves(store: LoraStore) -> None:
    store.create("u/x", writer(0, weight_bytes=64 * 1024), meta("u/x"))
    public = store.root / "u" / "x"
    stop = threading.Event()
    seen: list[int] = []
    errors: list[str] = []

    def read() -> None:
        while not stop.is_set():
            try:
                snapshot = Path(os.path.realpath(public))  # resolve once, then read the pair from one snapshot
                a, b = counters(snapshot)
                json.loads((public / CONFIG).read_text())  # the public path itself is complete at every instant
            except Exception as e:  # noqa: BLE001 - any failure is the finding
                errors.append(repr(e))
                return
            if a != b:
                errors.append(f"mixed snapshot: config {a}, weights {b}")
                return
            seen.append(a)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for n in range(1, 51):
            store.save("u/x", writer(n, weight_bytes=64 * 1024), meta("u/x", step=n))
    finally:
        stop.set()
        reader.join()
    assert errors == []
    assert len(seen) > 50 and seen == sorted(seen), "reads happened and never went back in time"
    assert counters(public) == (50, 50) and store.read_metadata("u/x").step == 50


def test_gc_keeps_current_and_previous_snapshot_only(tmp_path: Path) -> None:
    store = LoraStore(tmp_path / "loras", superseded_grace_s=0.0)
    store.create("u/x", writer(0), meta("u/x"))
    for n in range(1, 6):
        resolved_before = store.snapshot_path("u/x")
        store.save("u/x", writer(n), meta("u/x", step=n))
        assert counters(resolved_before) == (n - 1, n - 1), "a reader that resolved before the switch still reads"
    snapshots = sorted((store.root / ".snapshots" / "u%2Fx").iterdir())
    assert len(snapshots) == 2
    assert [counters(s) for s in snapshots] == [(4, 4), (5, 5)]


def test_links_are_relative_so_the_root_can_move(tmp_path: Path) -> None:
    store = LoraStore(tmp_path / "a")
    store.create("u/x", writer(7), meta("u/x"))
    version = store.save_version("u/x", writer(8), meta("u/x"))
    for link in (store.root / "u").iterdir():
        assert not os.path.isabs(os.readlink(link))

    shutil.move(tmp_path / "a", tmp_path / "mounted")
    moved = LoraStore(tmp_path / "mounted")
    assert counters(moved.adapter_path("u/x")) == (7, 7)
    assert counters(moved.adapter_path("u/x@latest")) == (8, 8)
    assert moved.read_metadata(version).version_of == "u/x"


# ---------------------------------------------------------------------- versions
def test_save_version_adds_checkpoint_and_latest_alias(store: LoraStore) -> None:
    store.create("u/x", writer(0), meta("u/x"))
    in_place = tree_digest(store.snapshot_path("u/x"))

    v1 = store.save_version("u/x", writer(1), meta("u/x", step=1))
    v2 = store.save_version("u/x", writer(2), meta("u/x", step=2))
    assert re.fullmatch(r"u/x@\d{8}T\d{12}Z", v1) and v1 < v2
    assert tree_digest(store.snapshot_path("u/x")) == in_place, "the in-place adapter is untouched"
    assert counters(store.adapter_path(v1)) == (1, 1)
    assert store.adapter_path("u/x@latest") == store.root / "u" / "x@latest"
    assert counters(store.adapter_path("u/x@latest")) == (2, 2)
    got = store.read_metadata(v2)
    assert (got.lora_id, got.version_of, got.step) == (v2, "u/x", 2)

    listed = {e.lora_id: e.aliases for e in store.list("u/")}
    assert listed == {"u/x": [], v1: [], v2: ["u/x@latest"]}

    with pytest.raises(InvalidLoraIdError, match="is an alias"):
        store.delete("u/x@latest")
    with pytest.raises(InvalidLoraIdError, match="names a version"):
        store.save(v1, writer(9), meta(v1))
    store.delete(v2)  # deleting the newest moves @latest back
    assert counters(store.adapter_path("u/x@latest")) == (1, 1)
    store.delete(v1)
    assert not store.exists("u/x@latest") and store.exists("u/x")

    v3 = store.save_version("u/x", writer(3), meta("u/x", step=3))
    store.delete("u/x")  # the adapter goes with all its versions and aliases
    assert not any(store.exists(i) for i in ("u/x", v3, "u/x@latest"))
    assert store.list() == [] and list((store.root / ".snapshots").iterdir()) == []


# ---------------------------------------------------------------------- export
def test_export_zip_round_trips_without_optimizer_state(store: LoraStore, tmp_path: Path) -> None:
    store.create("u/x", writer(5), meta("u/x"))
    data = store.export_zip("u/x")
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        assert sorted(archive.namelist()) == [CONFIG, WEIGHTS, METADATA_FILE]
        archive.extractall(tmp_path / "unzipped")
    snapshot = store.snapshot_path("u/x")
    for name in (CONFIG, WEIGHTS, METADATA_FILE):
        assert (tmp_path / "unzipped" / name).read_bytes() == (snapshot / name).read_bytes()


# ---------------------------------------------------------------------- locks
def test_lock_held_by_another_thread_times_out(store: LoraStore) -> None:
    store.create("u/x", writer(0), meta("u/x"))
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with store.lock("u/x", timeout=1):
            held.set()
            release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert held.wait(10)
        with pytest.raises(LoraLockTimeoutError, match="u/x") as caught:
            with LoraStore(store.root).lock("u/x@latest", timeout=0.1):  # another store; a version locks its adapter
                pass
        assert isinstance(caught.value, TimeoutError)
        with store.lock("u/y", timeout=0.1):  # other adapters are not affected
            pass
        # Another thread that the holder did not authorize waits for the lock, like another process (issue 8: a
        # per-process "held" flag let a delete or save from any thread skip it).
        before = tree_digest(store.root)
        with pytest.raises(LoraLockTimeoutError):
            LoraStore(store.root, lock_timeout=0.2).save("u/x", writer(1), meta("u/x", step=1))
        with pytest.raises(LoraLockTimeoutError):
            LoraStore(store.root, lock_timeout=0.2).delete("u/x")
        assert tree_digest(store.root) == before
    finally:
        release.set()
        holder.join()
    with store.lock("u/x", timeout=0.1):
        pass


def test_lock_held_by_another_process_times_out(store: LoraStore) -> None:
    store.create("u/x", writer(0), meta("u/x"))
    script = (
        "import sys; from pathlib import Path; from claas.training.storage import LoraStore\n"
        "with LoraStore(Path(sys.argv[1])).lock('u/x', timeout=10):\n"
        "    print('locked', flush=True); sys.stdin.read()\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", script, str(store.root)],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "locked"
        with pytest.raises(LoraLockTimeoutError, match="another process"):
            with store.lock("u/x", timeout=0.2):
                pass
        before = tree_digest(store.root)
        with pytest.raises(LoraLockTimeoutError):
            LoraStore(store.root, lock_timeout=0.2).save("u/x", writer(1), meta("u/x", step=1))
        assert tree_digest(store.root) == before
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait(10)
    with store.lock("u/x", timeout=1):
        store.save("u/x", writer(1), meta("u/x", step=1))
    assert store.read_metadata("u/x").step == 1


def test_lock_may_be_entered_and_exited_on_different_threads(store: LoraStore) -> None:
    """The feedback transaction enters and exits through asyncio.to_thread, on whatever pool thread comes up."""
    store.create("u/x", writer(0), meta("u/x"))
    held = store.lock("u/x", timeout=1)
    with ThreadPoolExecutor(max_workers=1) as enter, ThreadPoolExecutor(max_workers=1) as work:
        hold = enter.submit(held.__enter__).result()
        with pytest.raises(LoraLockTimeoutError):  # held: this thread cannot take it ...
            with store.lock("u/x", timeout=0.1):
                pass
        with hold.authorize():  # ... but a save the holder authorizes runs, on a worker given its context
            context = contextvars.copy_context()
        work.submit(context.run, store.save, "u/x", writer(1), meta("u/x", step=1)).result()
        with pytest.raises(LoraLockTimeoutError):  # and an unauthorized one does not
            work.submit(LoraStore(store.root, lock_timeout=0.1).save, "u/x", writer(2), meta("u/x", step=2)).result()
    with ThreadPoolExecutor(max_workers=1) as leave:
        leave.submit(held.__exit__, None, None, None).result()
    with store.lock("u/x", timeout=0.1):
        assert store.read_metadata("u/x").step == 1


def test_superseded_snapshots_survive_their_grace_period(tmp_path: Path) -> None:
    """A reader that resolved the link before several saves still reads complete files within the grace period."""
    store = LoraStore(tmp_path / "loras", superseded_grace_s=0.5)
    store.create("u/x", writer(0), meta("u/x"))
    resolved_early = store.snapshot_path("u/x")
    for n in range(1, 5):
        store.save("u/x", writer(n), meta("u/x", step=n))
    assert counters(resolved_early) == (0, 0)
    time.sleep(0.6)
    store.save("u/x", writer(5), meta("u/x", step=5))
    assert not resolved_early.exists()
    assert len(list((store.root / ".snapshots" / "u%2Fx").iterdir())) == 2
