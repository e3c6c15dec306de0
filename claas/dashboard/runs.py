"""Eval runs in `settings.eval_dir`, as the eval harness writes them:

    <eval_dir>/<run_id>/summary.json          run_id, status, created_at, base_model, claas_url, num_steps,
                                              preferences: {name: {lora_id, steps_completed, baseline, final}}
    <eval_dir>/<run_id>/<preference>/         metadata.json, baseline.json ({"metrics": {...}}),
                                              steps.jsonl (one JSON object per step, its values under "metrics")
    <eval_dir>/<run_id>/plots/*.png

A run without summary.json is in progress: its preferences come from the sub-folders (steps = the complete lines of
steps.jsonl; "final" = the latest value of each metric so far, as the harness's summary computes it).
Parsing is lenient (missing keys are None, unknown keys are kept in `extra`). Names from a request are checked
against the grammar of `claas.dashboard.paths` and resolved inside `eval_dir`.

Not here: running evals, drawing plots, HTML.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from claas.dashboard.paths import check_name, existing_file, inside, is_safe_name
from claas.errors import NotFoundError

logger = logging.getLogger(__name__)

SUMMARY_KEYS = frozenset({"run_id", "status", "created_at", "base_model", "claas_url", "num_steps", "preferences"})
#: "change" is shown as the table's change column (final - baseline), so it is not repeated as an extra field.
PREFERENCE_KEYS = frozenset({"lora_id", "steps_completed", "baseline", "final", "change"})
PLOTS_DIR = "plots"


@dataclass(frozen=True)
class MetricRow:
    name: str
    baseline: Any
    final: Any

    @property
    def change(self) -> float | None:
        """final - baseline when both are numbers, else None."""
        if _is_number(self.baseline) and _is_number(self.final):
            return self.final - self.baseline
        return None


@dataclass(frozen=True)
class PreferenceResult:
    name: str
    lora_id: str | None = None
    steps_completed: Any = None
    rows: list[MetricRow] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class EvalRun:
    run_id: str
    in_progress: bool
    status: str | None = None  # the summary's status (complete, interrupted, failed), or None while in progress
    created_at: str | None = None
    base_model: str | None = None
    claas_url: str | None = None
    num_steps: Any = None
    preferences: list[PreferenceResult] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    problem: str | None = None  # e.g. an unreadable summary.json
    sort_time: float = 0.0  # created_at, else the folder's mtime (seconds since the epoch)


def list_runs(eval_dir: Path) -> list[EvalRun]:
    """Every run folder under `eval_dir`, newest first."""
    if not eval_dir.is_dir():
        return []
    runs = [
        _read_run(path)
        for path in eval_dir.iterdir()
        if is_safe_name(path.name) and inside(eval_dir, path.name) is not None and path.is_dir()
    ]
    return sorted(runs, key=lambda run: (run.sort_time, run.run_id), reverse=True)


def load_run(eval_dir: Path, run_id: str) -> EvalRun:
    return _read_run(run_dir(eval_dir, run_id))


def run_dir(eval_dir: Path, run_id: str) -> Path:
    """The folder of `run_id`: 422 for a name outside the grammar, 404 when missing or outside `eval_dir`."""
    check_name(run_id, "run_id")
    path = inside(eval_dir, run_id)
    if path is None or not path.is_dir():
        raise NotFoundError(f"eval run {run_id!r} not found", param="run_id")
    return path


def plot_names(eval_dir: Path, run_id: str) -> list[str]:
    """The PNG files under `<run>/plots/`, sorted by name (only names a plot URL can address)."""
    plots = inside(run_dir(eval_dir, run_id), PLOTS_DIR)
    if plots is None or not plots.is_dir():
        return []
    root = eval_dir.resolve()
    names = []
    for path in plots.iterdir():
        resolved = path.resolve()
        if is_safe_name(path.name) and path.suffix == ".png" and resolved.is_relative_to(root) and resolved.is_file():
            names.append(path.name)
    return sorted(names)


def plot_path(eval_dir: Path, run_id: str, name: str) -> Path:
    check_name(name, "name")
    if not name.endswith(".png"):
        raise NotFoundError(f"plot {name!r} not found: plots are .png files", param="name")
    run_dir(eval_dir, run_id)
    return existing_file(eval_dir, run_id, PLOTS_DIR, name, what=f"plot {name!r} of eval run {run_id!r}")


def metric_rows(baseline: Any, final: Any) -> list[MetricRow]:
    """One row per metric in either mapping, baseline's order first."""
    base = baseline if isinstance(baseline, dict) else {}
    last = final if isinstance(final, dict) else {}
    names = list(base) + [name for name in last if name not in base]
    return [MetricRow(str(name), base.get(name), last.get(name)) for name in names]


def _read_run(path: Path) -> EvalRun:
    summary_path = path / "summary.json"
    problem = None
    if summary_path.is_file():
        summary = _read_json(summary_path)
        if isinstance(summary, dict):
            return _completed(path, summary)
        problem = "summary.json is not a readable JSON object"
    return _in_progress(path, problem)


def _completed(path: Path, summary: dict[str, Any]) -> EvalRun:
    raw_prefs = summary.get("preferences")
    preferences = []
    for name, pref in (raw_prefs.items() if isinstance(raw_prefs, dict) else []):
        pref = pref if isinstance(pref, dict) else {}
        preferences.append(
            PreferenceResult(
                name=str(name),
                lora_id=_str(pref.get("lora_id")),
                steps_completed=pref.get("steps_completed"),
                rows=metric_rows(pref.get("baseline"), pref.get("final")),
                extra={k: v for k, v in pref.items() if k not in PREFERENCE_KEYS},
            )
        )
    created_at = _str(summary.get("created_at"))
    return EvalRun(
        run_id=path.name,
        in_progress=False,
        status=_str(summary.get("status")),
        created_at=created_at,
        base_model=_str(summary.get("base_model")),
        claas_url=_str(summary.get("claas_url")),
        num_steps=summary.get("num_steps"),
        preferences=preferences,
        extra={k: v for k, v in summary.items() if k not in SUMMARY_KEYS},
        sort_time=_sort_time(created_at, path),
    )


def _in_progress(path: Path, problem: str | None) -> EvalRun:
    preferences = []
    for sub in sorted(path.iterdir()):
        if sub.name == PLOTS_DIR or not is_safe_name(sub.name) or not sub.is_dir():
            continue
        if not sub.resolve().is_relative_to(path.resolve()):  # a symlink out of the run folder
            continue
        metadata = _read_json(sub / "metadata.json")
        metadata = metadata if isinstance(metadata, dict) else {}
        steps = _read_steps(sub / "steps.jsonl")
        latest: dict[str, Any] = {}
        for step in steps:
            latest.update(_metrics(step))
        preferences.append(
            PreferenceResult(
                name=sub.name,
                lora_id=_str(metadata.get("lora_id")),
                steps_completed=len(steps),
                rows=metric_rows(_metrics(_read_json(sub / "baseline.json")), latest),
            )
        )
    return EvalRun(run_id=path.name, in_progress=True, preferences=preferences, problem=problem,
                   sort_time=_sort_time(None, path))


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        logger.warning("unreadable eval file %s: %s", path, exc)
        return None


def _read_steps(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of steps.jsonl, one a line; a torn last line (a step being written) is not counted."""
    try:
        with path.open("rb") as handle:
            lines = [line for line in handle if line.strip()]
    except FileNotFoundError:
        return []
    except OSError as exc:
        logger.warning("unreadable eval file %s: %s", path, exc)
        return []
    steps = []
    for line in lines:
        try:
            step = json.loads(line)
        except ValueError:
            continue  # torn or corrupt line
        if isinstance(step, dict):
            steps.append(step)
    return steps


def _metrics(record: Any) -> dict[str, Any]:
    """The metric values of a baseline.json / step record: its "metrics" mapping, or the record itself if flat."""
    if not isinstance(record, dict):
        return {}
    inner = record.get("metrics")
    return inner if isinstance(inner, dict) else record


def _sort_time(created_at: str | None, path: Path) -> float:
    if created_at:
        try:
            moment = datetime.fromisoformat(created_at)
            return (moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).timestamp()
        except ValueError:
            pass  # not ISO: fall back to the folder's mtime
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _str(value: Any) -> str | None:
    return None if value is None else value if isinstance(value, str) else str(value)
