"""Where the time of one eval step goes: generation, feedback (split into the gateway's phases), measurement.

    python benchmarks/bench_eval.py [--steps 3] [--model smollm2-135m] [--concurrency 8]

Starts `python -m claas.modelserver` and `uvicorn claas.api:web_app` (the real app, local engine) on free 127.0.0.1
ports, runs the eval harness for `--steps` steps of the identity preference with every metric measured at every
step, and reads the phase timings back from the run's steps.jsonl. The baseline of the same run is one plain greedy
chat of the harness's answer length through the gateway (median of 5): every phase is also given in units of that
generation, so the figures compare across machines. `--concurrency` is the harness's `measure.concurrency` (probe
requests in flight at once; 1 measures one request at a time). The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from rich.console import Console

from claas.eval.runner import run_eval
from claas.eval.settings import compose_config
from claas.processes import free_port, stop_process, wait_until_healthy


def start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with log.open("wb") as out:
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--concurrency", type=int, default=8, help="measure.concurrency (probe requests at once)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="claas-bench-eval-"))
    model_port, api_port = free_port(), free_port()
    model_url, api_url = f"http://127.0.0.1:{model_port}", f"http://127.0.0.1:{api_port}"
    env = {**os.environ, "CLAAS_VLLM_BASE_URL": model_url, "CLAAS_LORA_ROOT": str(work / "loras"),
           "CLAAS_FEEDBACK_LOG_DIR": str(work / "feedback"), "CLAAS_BASE_MODEL": args.model}  # fmt: skip
    env.pop("CLAAS_API_KEYS", None)
    server = start([sys.executable, "-m", "claas.modelserver", "--model", args.model, "--port", str(model_port)],
                   env, work / "model-server.log")  # fmt: skip
    processes = [server]
    try:
        wait_until_healthy(f"{model_url}/health", server, name="model server", timeout_s=300)
        api = start([sys.executable, "-m", "uvicorn", "claas.api:web_app", "--host", "127.0.0.1", "--port",
                     str(api_port), "--log-level", "warning", "--no-access-log"], env, work / "api.log")  # fmt: skip
        processes.append(api)
        wait_until_healthy(f"{api_url}/v1/models", api, name="api", timeout_s=300)

        cfg = compose_config([f"claas_url={api_url}", f"output_dir={work / 'evals'}", "run_id=bench",
                              "preferences=[identity]", f"num_steps={args.steps}", f"base_model={args.model}",
                              "measure.every=1", "measure.slow_every=1",
                              f"measure.concurrency={args.concurrency}"])  # fmt: skip
        body = {"model": args.model, "messages": [{"role": "user", "content": "Who are you?"}],
                "max_tokens": cfg.generation.max_tokens, "temperature": 0.0, "ignore_eos": True}  # fmt: skip
        unit = []
        with httpx.Client(base_url=api_url, timeout=300) as client:
            for _ in range(5):
                started = time.perf_counter()
                client.post("/v1/chat/completions", json=body).raise_for_status()
                unit.append(time.perf_counter() - started)
        generation_unit_s = statistics.median(unit)

        folder = run_eval(cfg, Console(stderr=True))
        steps = folder.read_steps("identity")
    finally:
        for process in reversed(processes):
            stop_process(process)

    def median_of(values: list[float]) -> float:
        return round(statistics.median(values), 3)

    phases = {name: median_of([s["phase_s"][name] for s in steps]) for name in ("generate", "feedback", "measure")}
    feedback_phases = sorted({k for s in steps for k in s["feedback"]["timing_ms"]} - {"total"})
    feedback_split_s = {
        name: median_of([s["feedback"]["timing_ms"].get(name, 0.0) / 1000 for s in steps]) for name in feedback_phases
    }
    metric_names = sorted({k for s in steps for k in s["metric_s"]})
    measure_split_s = {name: median_of([s["metric_s"].get(name, 0.0) for s in steps]) for name in metric_names}
    step_s = round(sum(phases.values()), 3)
    result = {
        "benchmark": "eval_step",
        "model": args.model,
        "concurrency": args.concurrency,
        "steps": len(steps),
        "generation_unit_s": round(generation_unit_s, 3),
        "step_s": step_s,
        "step_in_generation_units": round(step_s / generation_unit_s, 2),
        "phases_s": phases,
        "phase_share": {name: round(value / step_s, 3) for name, value in phases.items()},
        "feedback_split_s": feedback_split_s,
        "measure_in_generation_units": round(phases["measure"] / generation_unit_s, 2),
        "measure_split_s": measure_split_s,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
