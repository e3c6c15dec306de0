"""Fixtures of the dashboard tests: feedback records written by the feedback transaction's own writer
(`claas.feedback._write_log`, so they have exactly the shape the API writes), eval runs in the harness's layout with
real PNG plots (matplotlib), and the real app (`build_app`) on those folders.

The dashboards read only settings and files; the app still needs an engine, so it gets the real LocalEngine on an
empty adapter store (its model is never loaded: a passed-in engine is not warmed up).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from claas.api import build_app
from claas.core.config import Settings
from claas.core.types import DistillResult, FeedbackItem, TrainingExample
from claas.feedback import Transaction, _write_log
from claas.training.engine.base import TrainingEngine


def write_feedback_record(
    log_dir: Path,
    lora_id: str,
    *,
    feedback: str,
    prompt: str | list[dict[str, Any]] = "What is the capital of France?",
    response: str = "Paris.",
    source: Literal["cache", "tokenized"] = "tokenized",
    failure: BaseException | None = None,
) -> dict[str, Any]:
    """One record written by the API's own writer; returns it as read back from disk (plus `path`)."""
    tx = Transaction(request_id=uuid.uuid4().hex, lora_id=lora_id)
    tx.timing_ms.update({"resolve": 1.25, "lock_wait": 0.5, "sleep": 12.0, "distill": 340.5, "save": 20.0,
                         "wake": 30.0, "reload": 15.0, "total": 420.0})
    tx.slept = tx.woke = True
    item = FeedbackItem(lora_id=lora_id, prompt=prompt, response=response, feedback=feedback)
    messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    example = TrainingExample(messages=messages, response_text=response, feedback=feedback, source=source)
    result = None
    if failure is None:
        result = DistillResult(
            lora_id=lora_id, step=3, metrics={"loss": 0.4321, "jsd": 0.1234, "kl_reg": 0.01, "tokens": 12.0},
            timing_ms={"tokenize": 2.0, "compute": 300.0, "save": 20.0},
        ).model_dump()
    else:
        tx.phase = "distill"
    path = _write_log(log_dir, tx, [item], [example], result, failure)
    record = json.loads(path.read_text())
    record["path"] = path
    return record


def write_png(path: Path, title: str) -> None:
    """A small real PNG: a line plot drawn by matplotlib (no pyplot, so no global backend state)."""
    from matplotlib.figure import Figure

    path.parent.mkdir(parents=True, exist_ok=True)
    figure = Figure(figsize=(4, 3), dpi=50)
    axes = figure.subplots()
    axes.plot([0, 1, 2, 3], [0.2, 0.5, 0.6, 0.9], marker="o")
    axes.set_title(title)
    figure.savefig(path, format="png")


#: summary.json's "preferences", in the shape `claas.eval.summary.summarize` writes (plus a key it does not).
PREFERENCES: dict[str, dict[str, Any]] = {
    "no_emoji": {
        "lora_id": "eval/run1/no_emoji",
        "feedback": "Never use emoji.",
        "steps_completed": 5,
        "baseline": {"identity_compliance": 0.25, "identity_margin": -0.5, "capability": 0.8},
        "final": {"identity_compliance": 0.75, "identity_margin": 0.25, "capability": 0.78, "new_metric": 3},
        "change": {"identity_compliance": 0.5, "identity_margin": 0.75, "capability": -0.02},
        "first_step_compliance_ge_0.8": None,
    },
    "concise": {
        "lora_id": "eval/run1/concise",
        "feedback": "Be brief.",
        "steps_completed": 5,
        "baseline": {"identity_compliance": 0.5},
        "final": {"identity_compliance": 0.5, "note": "unchanged"},
        "seed": 7,
    },
}


def write_eval_run(eval_dir: Path, run_id: str, *, complete: bool = True, created_at: str = "2026-05-01T10:00:00Z",
                   steps: int = 5, plots: tuple[str, ...] = ("identity_compliance.png", "capability.png")) -> Path:
    """A run in the eval harness's layout (`claas.eval.rundir`); without `complete`, no summary.json (in progress).
    Step i's identity_compliance is i / 10."""
    run = eval_dir / run_id
    for name, pref in PREFERENCES.items():
        folder = run / name
        folder.mkdir(parents=True, exist_ok=True)
        metadata = {"preference": {"name": name, "feedback": pref["feedback"]}, "lora_id": pref["lora_id"],
                    "base_model": "smollm2-135m", "started_at": "2026-05-01T09:00:00+00:00"}
        (folder / "metadata.json").write_text(json.dumps(metadata))
        (folder / "baseline.json").write_text(json.dumps({"step": 0, "metrics": pref["baseline"], "measure_s": 1.5}))
        lines = [
            json.dumps({"step": i, "adapter_step": i, "metrics": {"identity_compliance": i / 10},
                        "feedback": {"metrics": {"loss": 0.5}}, "trained_on": []})
            for i in range(1, steps + 1)
        ]
        (folder / "steps.jsonl").write_text("".join(line + "\n" for line in lines))
    for plot in plots:
        write_png(run / "plots" / plot, plot)
    if complete:
        summary = {"run_id": run_id, "status": "complete", "created_at": created_at, "base_model": "smollm2-135m",
                   "claas_url": "http://127.0.0.1:8080", "num_steps": steps, "preferences": PREFERENCES,
                   "git_commit": "abc123"}
        (run / "summary.json").write_text(json.dumps(summary))
    return run


@dataclass
class DashboardData:
    root: Path
    log_dir: Path
    eval_dir: Path

    def settings(self, **overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "vllm_base_url": "http://127.0.0.1:9",  # never called: the dashboards read only files
            "lora_root": self.root / "loras",
            "model_cache": self.root / "models",
            "feedback_log_dir": self.log_dir,
            "eval_dir": self.eval_dir,
        }
        values.update(overrides)
        return Settings(_env_file=None, **values)  # type: ignore[call-arg]


@pytest.fixture
def data(tmp_path: Path) -> DashboardData:
    return DashboardData(tmp_path, tmp_path / "feedback", tmp_path / "evals")


@pytest.fixture(scope="session")
def idle_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TrainingEngine]:
    """The real local engine on an empty store, never asked to train (so its model is never loaded)."""
    from claas.training.engine.local import LocalEngine

    root = tmp_path_factory.mktemp("dashboard-engine")
    settings = Settings(_env_file=None, lora_root=root / "loras", model_cache=root / "models")  # type: ignore[call-arg]
    engine = LocalEngine(settings)
    yield engine
    asyncio.run(engine.close())


@pytest.fixture
def make_client(data: DashboardData, idle_engine: TrainingEngine) -> Callable[..., contextlib.AbstractContextManager]:
    """`with make_client(api_keys=...) as client`: the real app (lifespan included) on `data`'s folders."""

    @contextlib.contextmanager
    def factory(**settings: Any) -> Generator[TestClient]:
        app: FastAPI = build_app(data.settings(**settings), engine=idle_engine)
        with TestClient(app, raise_server_exceptions=False) as client:
            yield client

    return factory


@pytest.fixture(scope="session")
def write_record() -> Callable[..., dict[str, Any]]:
    return write_feedback_record


@pytest.fixture(scope="session")
def write_run() -> Callable[..., Path]:
    return write_eval_run
