"""The eval loop, per preference: a fresh adapter, a baseline, then per step: answers to training prompts through
the gateway, feedback on exactly those answers, measurement. Resumable: a rerun with the same `run_id` continues
after the last recorded step (and records a step whose feedback landed but whose measurement did not)."""

from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from claas.eval.client import ClaasClient, ServedAnswer
from claas.eval.metrics import MeasureContext, get_metric
from claas.eval.plotting import make_plots
from claas.eval.rundir import RunFolder, new_run_id, read_json, write_json
from claas.eval.settings import EvalConfig, Preference, load_preference
from claas.eval.summary import summarize

HEADLINE = ("compliance_greedy", "margin", "capability")


class ResumeError(RuntimeError):
    """The run folder and the service disagree in a way a rerun cannot repair."""


def measure(
    client: ClaasClient, cfg: EvalConfig, preference: Preference, lora_id: str, step: int, *, slow: bool
) -> dict[str, Any]:
    started = time.perf_counter()
    ctx = MeasureContext(client=client, model=lora_id, preference=preference, config=cfg, seed=cfg.seed + step)
    values: dict[str, float] = {}
    details: dict[str, Any] = {}
    metric_s: dict[str, float] = {}
    for name in cfg.measure.metrics:
        metric = get_metric(name)
        if metric.slow and not slow:
            continue
        metric_started = time.perf_counter()
        result = metric.measure(ctx)
        metric_s[name] = round(time.perf_counter() - metric_started, 3)
        values.update(result.values)
        details[name] = result.details
    return {"metrics": values, "details": details, "metric_s": metric_s,
            "measure_s": round(time.perf_counter() - started, 3)}


def _due(step: int, every: int, last: int) -> bool:
    return step % every == 0 or step == last


def _training_prompts(cfg: EvalConfig, preference: Preference, step: int) -> list[str]:
    prompts = preference.training_prompts
    start = (step - 1) * cfg.feedback_batch_size
    return [prompts[(start + offset) % len(prompts)] for offset in range(cfg.feedback_batch_size)]


def _feedback_summary(result: dict[str, Any]) -> dict[str, Any]:
    distill = result.get("distill_result") or {}
    return {
        "metrics": distill.get("metrics", {}),
        "adapter_step": distill.get("step"),
        "timing_ms": result.get("timing_ms", {}),
        "sources": result.get("sources", []),
        "request_id": result.get("request_id"),
    }


def run_preference(
    client: ClaasClient, cfg: EvalConfig, folder: RunFolder, preference: Preference, progress: Progress
) -> None:
    lora_id = f"{cfg.lora_prefix}/{folder.run_id}-{preference.name}"
    directory = folder.preference_dir(preference.name)
    steps = folder.read_steps(preference.name)
    adapter_step = client.lora_step(lora_id)
    if adapter_step is None:
        if steps:
            raise ResumeError(f"{lora_id} is gone from the service but {directory} has {len(steps)} steps")
        client.init_lora(lora_id)
        adapter_step = 0
    if not (directory / "metadata.json").is_file():
        write_json(
            directory / "metadata.json",
            {
                "preference": preference.model_dump(),
                "lora_id": lora_id,
                "base_model": cfg.base_model,
                "claas_url": cfg.claas_url,
                "openclaw_url": cfg.openclaw_url,
                "training_overrides": cfg.training,
                "feedback_batch_size": cfg.feedback_batch_size,
                "generation": cfg.generation.model_dump(),
                "started_at": datetime.now(timezone.utc).isoformat(),
            },
        )
    task = progress.add_task(preference.name, total=cfg.num_steps, completed=len(steps), status="baseline")
    if not (directory / "baseline.json").is_file():
        write_json(directory / "baseline.json", {"step": 0, **measure(client, cfg, preference, lora_id, 0, slow=True)})
    baseline = read_json(directory / "baseline.json")["metrics"]
    progress.update(task, status=_status(baseline))

    last = cfg.num_steps
    recorded_adapter_step = steps[-1]["adapter_step"] if steps else 0
    step = (steps[-1]["step"] if steps else 0) + 1
    if adapter_step != recorded_adapter_step and step <= last:
        # The previous process sent this step's feedback and stopped before recording it: measure and record it.
        record = {"step": step, "adapter_step": adapter_step, "recovered": True, "feedback": None, "trained_on": []}
        record.update(measure(client, cfg, preference, lora_id, step, slow=True))
        folder.append_step(preference.name, _stamped(record))
        progress.update(task, advance=1, status=_status(record["metrics"]))
        step += 1
    while step <= last:
        started = time.perf_counter()
        served: list[tuple[str, ServedAnswer]] = []
        for offset, prompt in enumerate(_training_prompts(cfg, preference, step)):
            answer = client.chat(
                lora_id,
                prompt,
                max_tokens=cfg.generation.max_tokens,
                temperature=cfg.generation.temperature,
                seed=cfg.seed * 100_000 + step * 100 + offset,
            )[0]
            served.append((prompt, answer))
        generate_s = time.perf_counter() - started
        started = time.perf_counter()
        result = client.feedback(lora_id, served, preference.feedback, cfg.training)
        feedback_s = time.perf_counter() - started
        feedback = _feedback_summary(result)
        record: dict[str, Any] = {
            "step": step,
            "adapter_step": feedback["adapter_step"],
            "feedback": feedback,
            "trained_on": [
                {"prompt": p, "response": a.text, "completion_id": a.completion_id, "finish_reason": a.finish_reason}
                for p, a in served
            ],
        }
        if _due(step, cfg.measure.every, last) or _due(step, cfg.measure.slow_every, last):
            record.update(
                measure(client, cfg, preference, lora_id, step, slow=_due(step, cfg.measure.slow_every, last))
            )
        else:
            record.update({"metrics": {}, "details": {}, "metric_s": {}, "measure_s": 0.0})
        record["phase_s"] = {
            "generate": round(generate_s, 3),
            "feedback": round(feedback_s, 3),
            "measure": record["measure_s"],
        }
        folder.append_step(preference.name, _stamped(record))
        progress.update(task, advance=1, status=_status(record["metrics"]))
        step += 1


def _stamped(record: dict[str, Any]) -> dict[str, Any]:
    return {**record, "timestamp": datetime.now(timezone.utc).isoformat()}


def _status(values: Any) -> str:
    return "  ".join(f"{key} {values[key]:.2f}" for key in HEADLINE if key in values)


def run_eval(cfg: EvalConfig, console: Console | None = None) -> RunFolder:
    """Run (or resume) every preference of `cfg`; always leaves a summary and plots of what was done."""
    console = console or Console()
    preferences = [load_preference(name) for name in cfg.preferences]
    for name in cfg.measure.metrics:
        get_metric(name)  # fail on an unknown metric before creating anything
    run_id = cfg.run_id or new_run_id()
    folder = RunFolder(cfg.output_dir, run_id)
    config_path = folder.path / "config.json"
    if not config_path.is_file():
        write_json(config_path, cfg.model_dump(mode="json") | {"run_id": run_id})
    client = ClaasClient(
        cfg.claas_url, timeout_s=cfg.request_timeout_s, openclaw_url=cfg.openclaw_url, openclaw_model=cfg.openclaw_model
    )
    status = "complete"
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[status]}"),
    )
    try:
        with Progress(*columns, console=console) as progress:
            for preference in preferences:
                run_preference(client, cfg, folder, preference, progress)
    except KeyboardInterrupt:
        status = "interrupted"
        console.print(f"[yellow]interrupted; rerun with run_id={run_id} to continue[/yellow]")
        raise
    except BaseException:
        status = "failed"
        raise
    finally:
        client.close()
        write_json(folder.summary_path, summarize(folder, cfg, status))
        make_plots(folder)
        console.print(f"run {run_id} ({status}): {folder.path}")
    return folder
