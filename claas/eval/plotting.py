"""The run's plots (matplotlib, no display): one figure per question a reader asks, each with a title, axis labels
with units and a legend. Everything is read back from the run folder.

- `<preference>_compliance.png`: held-out compliance per step (greedy, sampled), baseline dashed.
- `<preference>_margin.png`: logprob margin preferred - dispreferred per step.
- `capability.png`: capability pass rate per step, every preference (forgetting).
- `collapse.png`: token entropy, self-ROUGE-L, reference-text logprob drift.
- `sdpo.png`: the feedback steps' loss, JSD, gradient norm, IS ratio and step time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from claas.eval.rundir import RunFolder, read_json  # noqa: E402
from claas.eval.summary import COMPLIANCE_TARGET  # noqa: E402


def _series(
    baseline: dict[str, float], steps: list[dict[str, Any]], key: str, source: str = "metrics"
) -> tuple[list[int], list[float]]:
    xs, ys = ([0], [baseline[key]]) if source == "metrics" and key in baseline else ([], [])
    for record in steps:
        block = record.get(source) or {}
        if source == "feedback":
            timings = {f"{k}_ms": v for k, v in (block.get("timing_ms") or {}).items()}
            block = {**(block.get("metrics") or {}), **timings}
        if key in block:
            xs.append(int(record["step"]))
            ys.append(float(block[key]))
    return xs, ys


def _finish(fig: Any, ax: Any, path: Path, title: str, ylabel: str) -> None:
    ax.set_title(title)
    ax.set_xlabel("feedback step")
    ax.set_ylabel(ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _panels(
    path: Path,
    title: str,
    data: dict[str, tuple[dict[str, float], list[dict[str, Any]]]],
    panels: tuple[tuple[str, str, str], ...],
    *,
    shape: tuple[int, int],
    source: str = "metrics",
    relative_to_baseline: frozenset[str] | set[str] = frozenset(),
) -> Path:
    """One figure of (key, title, y label) panels, a line per preference."""
    rows, cols = shape
    fig, axes = plt.subplots(rows, cols, figsize=(13, 3.6 * rows + 0.4), squeeze=False)
    for ax, (key, panel_title, ylabel) in zip(axes.flat, panels):
        for name, (baseline, steps) in data.items():
            xs, ys = _series(baseline if source == "metrics" else {}, steps, key, source=source)
            if key in relative_to_baseline and key in baseline:
                ys = [y - baseline[key] for y in ys]
            if xs:
                ax.plot(xs, ys, marker="o" if source == "metrics" else ".", label=name)
        ax.set_title(panel_title)
        ax.set_xlabel("feedback step")
        ax.set_ylabel(ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.ticklabel_format(axis="y", useOffset=False)  # a ratio near 1 reads as 1.0000, not 1e-6 + 0.99999
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def make_plots(folder: RunFolder) -> list[Path]:
    folder.plots_dir.mkdir(parents=True, exist_ok=True)
    data = {}
    for name in folder.preferences():
        directory = folder.preference_dir(name)
        baseline_path = directory / "baseline.json"
        baseline = read_json(baseline_path)["metrics"] if baseline_path.is_file() else {}
        data[name] = (baseline, folder.read_steps(name))
    written: list[Path] = []
    for name, (baseline, steps) in data.items():
        fig, ax = plt.subplots(figsize=(6.4, 4))
        for key, label in (("compliance_greedy", "greedy"), ("compliance_sampled", "sampled")):
            xs, ys = _series(baseline, steps, key)
            if xs:
                ax.plot(xs, [100 * y for y in ys], marker="o", label=label)
            if key in baseline:
                ax.axhline(100 * baseline[key], linestyle="--", alpha=0.5, label=f"{label} baseline")
        ax.axhline(100 * COMPLIANCE_TARGET, color="green", linestyle=":", alpha=0.6, label="target")
        ax.set_ylim(-5, 105)
        path = folder.plots_dir / f"{name}_compliance.png"
        _finish(fig, ax, path, f"{name}: held-out compliance", "probes passing the verifier (%)")
        written.append(path)

        fig, ax = plt.subplots(figsize=(6.4, 4))
        xs, ys = _series(baseline, steps, "margin")
        if xs:
            ax.plot(xs, ys, marker="o", label="preferred - dispreferred")
        ax.axhline(0.0, color="grey", linewidth=0.8)
        path = folder.plots_dir / f"{name}_margin.png"
        _finish(fig, ax, path, f"{name}: logprob margin", "log p(preferred) - log p(dispreferred) (nats)")
        written.append(path)

    fig, ax = plt.subplots(figsize=(6.4, 4))
    for name, (baseline, steps) in data.items():
        xs, ys = _series(baseline, steps, "capability")
        if xs:
            ax.plot(xs, [100 * y for y in ys], marker="o", label=name)
    ax.set_ylim(-5, 105)
    path = folder.plots_dir / "capability.png"
    _finish(fig, ax, path, "Capability probes (facts, code, instruction)", "probes passed (%)")
    written.append(path)

    written.append(
        _panels(
            folder.plots_dir / "collapse.png",
            "Collapse alarms",
            data,
            (
                ("entropy_mean", "Mean token entropy", "nats per token"),
                ("self_rouge_l", "Self-ROUGE-L of samples", "ROUGE-L F1 (1 = identical)"),
                ("reference_logprob", "Reference text drift", "mean log p change vs baseline (nats/token)"),
            ),
            shape=(1, 3),
            relative_to_baseline={"reference_logprob"},
        )
    )
    written.append(
        _panels(
            folder.plots_dir / "sdpo.png",
            "SDPO diagnostics per feedback step",
            data,
            (
                ("loss", "SDPO loss", "loss"),
                ("jsd", "Divergence (generalized JSD; alpha 0 = KL)", "nats per token"),
                ("grad_norm", "Gradient norm (before clipping)", "L2 norm"),
                ("is_ratio_mean", "Importance ratio (mean)", "exp(logp - logp_rollout)"),
                ("distill_ms", "Step time (distill)", "ms"),
                ("reload_ms", "Adapter reload on the server", "ms"),
            ),
            shape=(2, 3),
            source="feedback",
        )
    )
    return written
