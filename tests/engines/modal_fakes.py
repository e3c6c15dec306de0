"""Stand-ins for Modal's cloud: a Volume with Modal's per-container view (commit publishes, reload pulls) on local
folders, and a deployed class whose `<method>.remote.aio(payload)` runs in-process (pickling the payload as Modal
does)."""

from __future__ import annotations

import asyncio
import pickle
import shutil
from pathlib import Path
from typing import Any


class FolderVolume:
    """One container's view (`view`) of a Volume whose committed state lives in `shared`."""

    def __init__(self, shared: Path, view: Path) -> None:
        self.shared, self.view = shared, view
        shared.mkdir(parents=True, exist_ok=True)
        view.mkdir(parents=True, exist_ok=True)
        self.reloads = 0
        self.commits = 0

    def reload(self) -> None:
        self.reloads += 1
        _mirror(self.shared, self.view)

    def commit(self) -> None:
        self.commits += 1
        _mirror(self.view, self.shared)


def _mirror(source: Path, target: Path) -> None:
    for child in list(target.iterdir()):
        if child.name == ".locks":  # lock files are per container; Modal does not share flocks either
            continue
        if child.is_symlink() or child.is_file():
            child.unlink()
        else:
            shutil.rmtree(child)
    for child in source.iterdir():
        if child.name == ".locks":
            continue
        destination = target / child.name
        if child.is_symlink():
            destination.symlink_to(child.readlink())
        elif child.is_dir():
            shutil.copytree(child, destination, symlinks=True)
        else:
            shutil.copy2(child, destination)


class _Remote:
    def __init__(self, fn: Any) -> None:
        self._fn = fn

    async def aio(self, payload: dict[str, Any]) -> Any:
        # Arguments and results cross a process boundary on Modal: they must pickle.
        result = await asyncio.to_thread(self._fn, pickle.loads(pickle.dumps(payload)))
        return pickle.loads(pickle.dumps(result))


class _Method:
    def __init__(self, fn: Any) -> None:
        self.remote = _Remote(fn)


class InProcessWorker:
    """What `modal.Cls.from_name("claas", "DistillWorker")()` gives the gateway, backed by an object in this process
    (a DistillWorkerCore, or anything with the methods)."""

    def __init__(self, target: Any) -> None:
        self.target = target

    def __getattr__(self, name: str) -> _Method:
        return _Method(getattr(self.target, name))
