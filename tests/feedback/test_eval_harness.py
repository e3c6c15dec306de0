"""The eval harness end to end against the real gateway + model server (tiny config: 2 steps, 2 probes)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from rich.console import Console

from claas.eval.rundir import RunFolder
from claas.eval.runner import run_eval
from claas.eval.settings import compose_config

pytestmark = pytest.mark.slow

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def tiny(gateway_url: str, output_dir: Path, *extra: str) -> list[str]:
    return [
        f"claas_url={gateway_url}",
        f"output_dir={output_dir}",
        "preferences=[identity]",
        "num_steps=2",
        "measure.probe_limit=2",
        "measure.max_tokens=12",
        "generation.max_tokens=12",
        "capability.limit=1",
        "collapse.samples=2",
        *extra,
    ]


def test_tiny_run_writes_a_complete_folder_and_resumes(feedback_gateway, tmp_path: Path) -> None:
    cfg = compose_config(tiny(feedback_gateway.base_url, tmp_path, "run_id=tiny"))
    folder = run_eval(cfg, Console(quiet=True))
    pref = folder.path / "identity"
    for name in ("metadata.json", "baseline.json", "steps.jsonl"):
        assert (pref / name).is_file(), name
    steps = folder.read_steps("identity")
    assert [s["step"] for s in steps] == [1, 2]
    assert [s["adapter_step"] for s in steps] == [1, 2]
    for record in steps:
        # feedback trained on exactly the served completion (found in the gateway's cache by its id)
        assert record["feedback"]["sources"] == ["cache"]
        assert record["trained_on"][0]["completion_id"]
        assert record["feedback"]["metrics"]["tokens"] > 0
        assert set(record["phase_s"]) == {"generate", "feedback", "measure"}
        assert 0.0 <= record["metrics"]["compliance_greedy"] <= 1.0
        assert len(record["details"]["compliance"]["greedy"]) == 2  # probe_limit
    assert "capability" in steps[-1]["metrics"] and "self_rouge_l" in steps[-1]["metrics"]  # slow ones at the end
    baseline = json.loads((pref / "baseline.json").read_text())
    assert {"margin", "compliance_greedy", "capability", "entropy_mean"} <= set(baseline["metrics"])

    summary = json.loads(folder.summary_path.read_text())
    assert summary["status"] == "complete"
    assert summary["preferences"]["identity"]["steps_completed"] == 2
    assert summary["preferences"]["identity"]["final"]["compliance_greedy"] == steps[-1]["metrics"]["compliance_greedy"]
    plots = sorted(p.name for p in folder.plots_dir.glob("*.png"))
    assert plots == ["capability.png", "collapse.png", "identity_compliance.png", "identity_margin.png", "sdpo.png"]
    for plot in folder.plots_dir.glob("*.png"):
        assert plot.read_bytes()[:8] == PNG_SIGNATURE and plot.stat().st_size > 5000

    # A feedback that landed without being recorded (the process died in between) is recorded on resume ...
    lora_id = summary["preferences"]["identity"]["lora_id"]
    extra = httpx.post(f"{feedback_gateway.v1}/feedback", timeout=300, json={
        "lora_id": lora_id, "prompt": "Who are you?", "response": "I'm SmolLM.", "feedback": "Say you are Kuro."})
    assert extra.status_code == 200, extra.text
    # ... and a rerun with the same run_id continues after it, without redoing the baseline.
    baseline_bytes = (pref / "baseline.json").read_bytes()
    resume = compose_config(tiny(feedback_gateway.base_url, tmp_path, "run_id=tiny", "num_steps=4"))
    run_eval(resume, Console(quiet=True))
    resumed = RunFolder(tmp_path, "tiny").read_steps("identity")
    assert [s["step"] for s in resumed] == [1, 2, 3, 4]
    assert resumed[2]["recovered"] is True and resumed[2]["adapter_step"] == 3
    assert resumed[3]["adapter_step"] == 4 and resumed[3]["feedback"]["sources"] == ["cache"]
    assert (pref / "baseline.json").read_bytes() == baseline_bytes


def test_cli_entry_point_runs_a_baseline_only_eval(feedback_gateway, tmp_path: Path) -> None:
    args = tiny(feedback_gateway.base_url, tmp_path, "run_id=cli", "num_steps=0", "measure.metrics=[margin]")
    result = subprocess.run([sys.executable, "-m", "claas.eval", *args], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads((tmp_path / "cli" / "summary.json").read_text())
    assert set(summary["preferences"]["identity"]["baseline"]) == {"margin"}
    assert summary["preferences"]["identity"]["steps_completed"] == 0


def test_bad_override_is_refused_before_anything_is_sent(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "claas.eval", "num_steps=-1", f"output_dir={tmp_path}", "claas_url=http://127.0.0.1:9"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert "num_steps" in result.stdout
    assert not any(tmp_path.iterdir())


def test_concurrent_probes_measure_what_one_at_a_time_does(feedback_gateway, tmp_path: Path) -> None:
    """`measure.concurrency` sends probes together (the model server batches them): the greedy answers, the
    capability answers and the margins are those of one request at a time."""
    from claas.eval.client import ClaasClient
    from claas.eval.runner import measure
    from claas.eval.settings import load_preference

    overrides = tiny(feedback_gateway.base_url, tmp_path, "measure.probe_limit=4", "capability.limit=3")
    client = ClaasClient(feedback_gateway.base_url)
    try:
        runs = {}
        for concurrency in (1, 4):
            cfg = compose_config([*overrides, f"measure.concurrency={concurrency}"])
            preference = load_preference("identity")
            runs[concurrency] = measure(client, cfg, preference, cfg.base_model, 0, slow=True)
    finally:
        client.close()
    one, together = runs[1], runs[4]
    assert together["details"]["compliance"]["greedy"] == one["details"]["compliance"]["greedy"]
    assert together["details"]["capability"] == one["details"]["capability"]
    margins = ("preferred_logprob", "dispreferred_logprob")
    for key in margins:
        assert together["details"]["margin"][key] == pytest.approx(one["details"]["margin"][key], abs=1e-3)
