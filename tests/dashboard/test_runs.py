"""Eval runs on disk and the name grammar that keeps every request inside the data folders."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from claas.dashboard.paths import check_name, inside, is_safe_name
from claas.dashboard.runs import MetricRow, list_runs, load_run, metric_rows, plot_names, plot_path, run_dir
from claas.errors import NotFoundError, UnprocessableError

RunWriter = Callable[..., Path]


@pytest.mark.parametrize("name", ["run1", "2026-05-01_12.30", "a", "A-b_c.d", "x" * 128, "_x", "-x", "plot.png"])
def test_safe_names(name: str) -> None:
    assert is_safe_name(name)
    assert check_name(name, "run_id") == name


@pytest.mark.parametrize(
    "name",
    ["", ".", "..", ".hidden", "../x", "a/b", "a\\b", "/etc", "a\x00b", "\x00", "a b", "x" * 129, "é", "%2e%2e", "a:b"],
)
def test_unsafe_names_are_rejected_naming_the_field(name: str) -> None:
    assert not is_safe_name(name)
    with pytest.raises(UnprocessableError) as caught:
        check_name(name, "run_id")
    assert caught.value.param == "run_id"


def test_inside_resolves_within_the_root_only(tmp_path: Path) -> None:
    (tmp_path / "root" / "a").mkdir(parents=True)
    root = tmp_path / "root"
    assert inside(root, "a") == (root / "a").resolve()
    assert inside(root, "..") is None
    assert inside(root, "a", "..", "..", "etc") is None
    assert inside(root, "/etc/passwd") is None
    os.symlink(tmp_path, root / "escape")
    assert inside(root, "escape") is None


def test_completed_run_summary(tmp_path: Path, write_run: RunWriter) -> None:
    write_run(tmp_path, "run1")

    run = load_run(tmp_path, "run1")

    assert not run.in_progress and run.problem is None and run.status == "complete"
    assert (run.base_model, run.num_steps, run.claas_url) == ("smollm2-135m", 5, "http://127.0.0.1:8080")
    assert run.extra == {"git_commit": "abc123"}
    no_emoji, concise = run.preferences
    assert (no_emoji.name, no_emoji.lora_id, no_emoji.steps_completed) == ("no_emoji", "eval/run1/no_emoji", 5)
    rows = {row.name: row for row in no_emoji.rows}
    assert list(rows) == ["identity_compliance", "identity_margin", "capability", "new_metric"]
    assert rows["identity_compliance"].change == pytest.approx(0.5)
    assert rows["capability"].change == pytest.approx(-0.02)
    assert (rows["new_metric"].baseline, rows["new_metric"].final, rows["new_metric"].change) == (None, 3, None)
    assert no_emoji.extra == {"feedback": "Never use emoji.", "first_step_compliance_ge_0.8": None}  # no "change"
    assert concise.extra == {"feedback": "Be brief.", "seed": 7}
    assert [row.name for row in concise.rows] == ["identity_compliance", "note"]
    assert plot_names(tmp_path, "run1") == ["capability.png", "identity_compliance.png"]


def test_run_in_progress_counts_steps(tmp_path: Path, write_run: RunWriter) -> None:
    live = write_run(tmp_path, "live", complete=False, steps=3, plots=())
    with (live / "no_emoji" / "steps.jsonl").open("a") as handle:
        handle.write('{"step": 4, "metr')  # a step being written

    run = load_run(tmp_path, "live")

    assert run.in_progress and run.created_at is None and run.status is None
    concise, no_emoji = run.preferences
    assert (concise.steps_completed, no_emoji.steps_completed) == (3, 3)
    assert no_emoji.lora_id == "eval/run1/no_emoji"
    rows = {row.name: (row.baseline, row.final) for row in no_emoji.rows}
    assert rows == {"identity_compliance": (0.25, 0.3), "identity_margin": (-0.5, None), "capability": (0.8, None)}
    assert plot_names(tmp_path, "live") == []


def test_unreadable_summary_is_shown_as_a_problem(tmp_path: Path, write_run: RunWriter) -> None:
    (write_run(tmp_path, "bad", plots=()) / "summary.json").write_text("{truncated")

    run = load_run(tmp_path, "bad")

    assert run.in_progress and run.problem and "summary.json" in run.problem


def test_summary_with_odd_shapes_is_tolerated(tmp_path: Path) -> None:
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "summary.json").write_text(json.dumps(
        {"created_at": "yesterday", "preferences": {"p": "not a mapping", "q": {"baseline": [1], "final": {"m": True}}}}
    ))

    run = load_run(tmp_path, "odd")

    assert [p.name for p in run.preferences] == ["p", "q"]
    assert run.preferences[0].rows == [] and run.preferences[1].rows == [MetricRow("m", None, True)]
    assert run.preferences[1].rows[0].change is None  # booleans are not numbers
    assert run.base_model is None and run.num_steps is None


def test_runs_are_listed_newest_first(tmp_path: Path, write_run: RunWriter) -> None:
    write_run(tmp_path, "older", created_at="2026-01-01T00:00:00+00:00", plots=())
    write_run(tmp_path, "newer", created_at="2026-03-01T00:00:00Z", plots=())
    live = write_run(tmp_path, "live", complete=False, plots=())
    os.utime(live, (4_000_000_000, 4_000_000_000))  # folder mtime in 2096: newer than both summaries
    (tmp_path / ".hidden").mkdir()
    (tmp_path / "stray.txt").write_text("x")
    os.symlink(tmp_path.parent, tmp_path / "escape")  # a folder outside the eval dir

    assert [run.run_id for run in list_runs(tmp_path)] == ["live", "newer", "older"]
    assert list_runs(tmp_path / "missing") == []


def test_metric_rows_union_in_baseline_order() -> None:
    rows = metric_rows({"b": 1, "a": 2.5}, {"a": 3.0, "c": 1})
    assert [(r.name, r.baseline, r.final, r.change) for r in rows] == [
        ("b", 1, None, None), ("a", 2.5, 3.0, 0.5), ("c", None, 1, None)
    ]
    assert metric_rows(None, "x") == []


def test_plot_path_stays_in_the_run(tmp_path: Path, write_run: RunWriter) -> None:
    root = tmp_path / "evals"
    run = write_run(root, "run1")
    (tmp_path / "secret.png").write_bytes(b"secret")
    os.symlink(tmp_path / "secret.png", run / "plots" / "link.png")

    assert plot_path(root, "run1", "capability.png") == (run / "plots" / "capability.png").resolve()
    assert "link.png" not in plot_names(root, "run1")
    for run_id, name, error in [
        ("run1", "link.png", NotFoundError),  # a symlink out of the folder
        ("run1", "missing.png", NotFoundError),
        ("run1", "summary.json", NotFoundError),  # not a plot
        ("run1", "../summary.json", UnprocessableError),
        ("run1", "..", UnprocessableError),
        ("run1", "/etc/passwd", UnprocessableError),
        ("run1", "x\x00.png", UnprocessableError),
        ("..", "secret.png", UnprocessableError),
        ("nope", "capability.png", NotFoundError),
    ]:
        with pytest.raises(error):
            plot_path(root, run_id, name)


def test_run_dir_rejects_files_and_escapes(tmp_path: Path) -> None:
    (tmp_path / "evals").mkdir()
    (tmp_path / "evals" / "file").write_text("x")
    os.symlink(tmp_path, tmp_path / "evals" / "up")
    for run_id in ("file", "up", "missing"):
        with pytest.raises(NotFoundError):
            run_dir(tmp_path / "evals", run_id)
