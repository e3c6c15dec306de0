"""The run folder, summary and plots on a synthetic run (no service): torn lines, resume bookkeeping, PNGs."""

from __future__ import annotations

import json
from pathlib import Path

from claas.eval.plotting import make_plots
from claas.eval.rundir import RunFolder, write_json
from claas.eval.settings import compose_config
from claas.eval.summary import first_step_reaching, latest_values, summarize


def synthetic_run(tmp_path: Path) -> RunFolder:
    folder = RunFolder(tmp_path, "synthetic")
    directory = folder.preference_dir("identity")
    write_json(directory / "metadata.json", {"lora_id": "eval/synthetic-identity", "preference": {"feedback": "Kuro"}})
    write_json(directory / "baseline.json", {"step": 0, "metrics": {"compliance_greedy": 0.0, "margin": -5.0,
                                                                    "capability": 1.0, "reference_logprob": -2.0}})
    for step, compliance in ((1, 0.2), (2, 0.9), (3, 0.7)):
        metrics = {"compliance_greedy": compliance, "compliance_sampled": compliance / 2, "margin": step - 3.0}
        if step == 3:
            metrics |= {"capability": 0.8, "entropy_mean": 1.5, "self_rouge_l": 0.3, "reference_logprob": -2.5}
        folder.append_step("identity", {
            "step": step, "adapter_step": step, "metrics": metrics,
            "feedback": {"metrics": {"loss": 1.0 / step, "jsd": 0.5, "grad_norm": 2.0, "is_ratio_mean": 1.0},
                         "timing_ms": {"distill": 900.0, "reload": 50.0}},
        })  # fmt: skip
    return folder


def test_a_torn_last_line_is_dropped_and_repaired(tmp_path: Path) -> None:
    folder = synthetic_run(tmp_path)
    path = folder.preference_dir("identity") / "steps.jsonl"
    intact = path.read_bytes()
    with path.open("ab") as handle:
        handle.write(b'{"step": 4, "adapter_st')  # killed mid-write
    assert [s["step"] for s in folder.read_steps("identity")] == [1, 2, 3]
    assert path.read_bytes() == intact  # the next append starts on a clean line
    folder.append_step("identity", {"step": 4, "adapter_step": 4, "metrics": {}})
    assert [s["step"] for s in folder.read_steps("identity")] == [1, 2, 3, 4]


def test_summary_reads_back_latest_values_and_the_first_step_on_target(tmp_path: Path) -> None:
    folder = synthetic_run(tmp_path)
    steps = folder.read_steps("identity")
    assert latest_values(steps)["compliance_greedy"] == 0.7
    assert latest_values(steps)["capability"] == 0.8
    assert first_step_reaching(steps, "compliance_greedy", 0.8) == 2
    assert first_step_reaching(steps, "compliance_greedy", 0.95) is None
    cfg = compose_config([f"output_dir={tmp_path}", "num_steps=3"])
    summary = summarize(folder, cfg, "complete")
    identity = summary["preferences"]["identity"]
    assert identity["steps_completed"] == 3 and identity["first_step_compliance_ge_0.8"] == 2
    assert identity["change"]["margin"] == 5.0 and identity["change"]["capability"] == -0.19999999999999996
    json.dumps(summary)  # serialisable as written


def test_plots_are_written_for_every_question(tmp_path: Path) -> None:
    folder = synthetic_run(tmp_path)
    paths = make_plots(folder)
    assert sorted(p.name for p in paths) == [
        "capability.png", "collapse.png", "identity_compliance.png", "identity_margin.png", "sdpo.png"]  # fmt: skip
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
