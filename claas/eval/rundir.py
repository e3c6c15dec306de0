"""The run folder: what one eval run leaves on disk, written so that a crash or Ctrl-C at any instant leaves it
consistent (JSON files replaced atomically; one steps.jsonl line per finished step, appended and fsynced).

    <output_dir>/<run_id>/summary.json
    <output_dir>/<run_id>/<preference>/metadata.json, baseline.json, steps.jsonl
    <output_dir>/<run_id>/plots/*.png
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any


def new_run_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


class RunFolder:
    def __init__(self, output_dir: Path, run_id: str) -> None:
        self.run_id = run_id
        self.path = output_dir / run_id
        self.path.mkdir(parents=True, exist_ok=True)

    @property
    def summary_path(self) -> Path:
        return self.path / "summary.json"

    @property
    def plots_dir(self) -> Path:
        return self.path / "plots"

    def preference_dir(self, name: str) -> Path:
        directory = self.path / name
        directory.mkdir(parents=True, exist_ok=True)
        return directory

    def preferences(self) -> list[str]:
        return sorted(p.name for p in self.path.iterdir() if (p / "metadata.json").is_file())

    def append_step(self, preference: str, record: dict[str, Any]) -> None:
        line = json.dumps(record, default=str) + "\n"
        with (self.preference_dir(preference) / "steps.jsonl").open("a") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())

    def read_steps(self, preference: str) -> list[dict[str, Any]]:
        """Every complete step record. A torn last line (the process was killed mid-write) is dropped from the
        file, so the next append starts on a clean line."""
        path = self.preference_dir(preference) / "steps.jsonl"
        if not path.is_file():
            return []
        records, good_bytes = [], 0
        with path.open("rb") as handle:
            for raw in handle:
                try:
                    records.append(json.loads(raw))
                except json.JSONDecodeError:
                    break
                if not raw.endswith(b"\n"):
                    records.pop()
                    break
                good_bytes += len(raw)
        if good_bytes != path.stat().st_size:
            with path.open("r+b") as handle:
                handle.truncate(good_bytes)
        return records
