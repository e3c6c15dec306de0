"""summary.json: per preference the baseline, the last measured value of every metric, and when compliance first
reached the target; read back from the run folder, so it is the same whether the run finished or was resumed."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from claas.eval.rundir import RunFolder, read_json
from claas.eval.settings import EvalConfig

COMPLIANCE_TARGET = 0.8


def latest_values(steps: list[dict[str, Any]]) -> dict[str, float]:
    """The most recent measured value of each metric (slow metrics are not measured every step)."""
    values: dict[str, float] = {}
    for record in steps:
        values.update(record.get("metrics") or {})
    return values


def first_step_reaching(steps: list[dict[str, Any]], metric: str, target: float) -> int | None:
    for record in steps:
        value = (record.get("metrics") or {}).get(metric)
        if value is not None and value >= target:
            return int(record["step"])
    return None


def summarize(folder: RunFolder, cfg: EvalConfig, status: str) -> dict[str, Any]:
    preferences: dict[str, Any] = {}
    for name in folder.preferences():
        directory = folder.preference_dir(name)
        metadata = read_json(directory / "metadata.json")
        baseline_path = directory / "baseline.json"
        baseline = read_json(baseline_path)["metrics"] if baseline_path.is_file() else {}
        steps = folder.read_steps(name)
        final = latest_values(steps)
        preferences[name] = {
            "lora_id": metadata["lora_id"],
            "feedback": metadata["preference"]["feedback"],
            "steps_completed": len(steps),
            "baseline": baseline,
            "final": final,
            "change": {k: final[k] - baseline[k] for k in final if k in baseline},
            f"first_step_compliance_ge_{COMPLIANCE_TARGET}": first_step_reaching(
                steps, "compliance_greedy", COMPLIANCE_TARGET
            ),
        }
    return {
        "run_id": folder.run_id,
        "status": status,
        "created_at": datetime.now(timezone.utc).isoformat(),
        "base_model": cfg.base_model,
        "claas_url": cfg.claas_url,
        "num_steps": cfg.num_steps,
        "feedback_batch_size": cfg.feedback_batch_size,
        "training_overrides": cfg.training,
        "preferences": preferences,
    }
