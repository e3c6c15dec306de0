"""Two API processes, one model server, one adapter root (issue 8 proof): concurrent feedbacks on ONE adapter, split
across two real `claas api` processes, lose no update and apply none twice. The final step equals the number of 200s,
the step numbers the 200s report are exactly 1..n, no answer is a 5xx, and the adapter's weights equal a serial
replay of the applied steps (in their step order, from the same initial adapter, on a fresh trainer) within 1e-5.

Also checked on the way, in the real processes: every log line they write for a request is a JSON object carrying
its request id, and a feedback's response, its X-Request-ID header and its feedback log record share one id.

The issue's 32 feedbacks (16 per process; ~50 s alone on 2 cores, each a real step that the replay repeats);
CLAAS_PROOF_FEEDBACKS sets another count."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from safetensors.torch import load_file

from claas.core.models import training_config_for
from claas.core.types import DistillBatch, TrainingConfig, TrainingExample
from claas.processes import free_port, stop_process, wait_until_healthy
from claas.training.storage import LoraMetadata, LoraStore
from claas.training.trainer import DistillationTrainer

pytestmark = pytest.mark.slow

FEEDBACKS = int(os.environ.get("CLAAS_PROOF_FEEDBACKS", "32"))
MODEL = "smollm2-135m"
CHEAP = {"learning_rate": 1e-3, "teacher_demonstration": False}  # a plain SDPO step: the cost is the step itself


@dataclass
class Api:
    url: str
    process: subprocess.Popen
    log: Path

    def json_lines(self) -> list[dict[str, Any]]:
        lines = self.log.read_text(errors="replace").splitlines()
        # Progress bars of transformers' weight loading write to stderr directly, not through logging.
        return [json.loads(line) for line in lines if line.startswith("{")]


@pytest.fixture(scope="module")
def two_apis(model_server: Any, model_cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[
        tuple[Api, Api, Path]]:
    root = tmp_path_factory.mktemp("two-apis")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLAAS_")}
    env.update({
        "CLAAS_VLLM_BASE_URL": model_server.base_url,
        "CLAAS_LORA_ROOT": str(root / "loras"),
        "CLAAS_FEEDBACK_LOG_DIR": str(root / "feedback"),
        "CLAAS_MODEL_CACHE": str(model_cache_dir),
        "CLAAS_BASE_MODEL": MODEL,
        "CLAAS_FEEDBACK_LOCK_TIMEOUT_S": "1800",
        "CLAAS_LOG_FORMAT": "json",
    })
    apis: list[Api] = []
    try:
        for name in ("a", "b"):
            port = free_port()
            log = root / f"api-{name}.log"
            with log.open("wb") as handle:
                process = subprocess.Popen(
                    [sys.executable, "-m", "claas", "api", "--host", "127.0.0.1", "--port", str(port)],
                    stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=root,  # cwd: no stray .env file
                )
            apis.append(Api(f"http://127.0.0.1:{port}", process, log))
        for api in apis:
            wait_until_healthy(f"{api.url}/v1/health", api.process, name="API", timeout_s=600)
        yield apis[0], apis[1], root
    finally:
        for api in apis:
            stop_process(api.process)


def _weights(store: LoraStore, lora_id: str) -> dict[str, torch.Tensor]:
    return load_file(str(store.snapshot_path(lora_id) / "adapter_model.safetensors"))


def test_concurrent_feedback_across_two_processes_equals_a_serial_replay(
    two_apis: tuple[Api, Api, Path], model_cache_dir: Path, tmp_path: Path
) -> None:
    api_a, api_b, root = two_apis
    lora_id = "two/shared"
    http = httpx.Client(timeout=3600)
    reply = http.post(f"{api_a.url}/v1/lora/init", json={"lora_id": lora_id, "lora_r": 2, "lora_alpha": 4})
    assert reply.status_code == 200, reply.text
    store = LoraStore(root / "loras", recover=False)
    initial = tmp_path / "initial"
    shutil.copytree(store.snapshot_path(lora_id), initial)

    def send(index: int) -> tuple[int, httpx.Response, dict[str, Any]]:
        body = {"lora_id": lora_id, "prompt": f"Question {index}: who are you?",
                "response": f"I am SmolLM, answer {index}.", "feedback": f"Say your name is Kuro-{index}.",
                "training": CHEAP}
        api = (api_a, api_b)[index % 2]
        return index, http.post(f"{api.url}/v1/feedback", json=body, headers={"X-Request-ID": f"two-{index}"}), body

    with ThreadPoolExecutor(FEEDBACKS) as pool:
        results = list(pool.map(send, range(FEEDBACKS)))
    statuses = [reply.status_code for _, reply, _ in results]
    assert not [s for s in statuses if s >= 500], [r.text for _, r, _ in results if r.status_code >= 500]
    applied = sorted(((r.json()["distill_result"]["step"], body) for _, r, body in results if r.status_code == 200),
                     key=lambda pair: pair[0])
    assert [step for step, _ in applied] == list(range(1, len(applied) + 1))  # each step once, none lost
    assert store.read_metadata(lora_id).step == len(applied) == statuses.count(200)
    assert len(applied) == FEEDBACKS  # with this lock timeout every one gets through

    # One id per feedback: header, body, feedback log record, and the JSON log lines of the process that ran it.
    lines: dict[str, list[str]] = {}
    for api in (api_a, api_b):
        for line in api.json_lines():
            lines.setdefault(str(line.get("request_id")), []).append(line["message"])
    for index, reply, _ in results:
        request_id = f"two-{index}"
        assert reply.headers["x-request-id"] == request_id == reply.json()["request_id"]
        record = json.loads(Path(reply.json()["feedback_log_path"]).read_text())
        assert record["request_id"] == request_id
        # The transaction's own line (the access log line carries the id too).
        assert any(message.startswith(f"feedback {request_id} on {lora_id}: ok") for message in lines[request_id])

    # The serial replay: the same initial adapter, the applied steps in step order, on a fresh trainer.
    replay_store = LoraStore(tmp_path / "replay")
    metadata = LoraMetadata.from_json((initial / "claas_metadata.json").read_text())

    def copy_initial(directory: Path) -> None:
        for path in initial.iterdir():
            if path.name != "claas_metadata.json":
                shutil.copy(path, directory / path.name)

    replay_store.create(lora_id, copy_initial, metadata)
    trainer = DistillationTrainer(base_model=MODEL, store=replay_store, cache_dir=model_cache_dir, hot_adapters=1)
    trainer.ensure_loaded()
    training = training_config_for(MODEL, TrainingConfig.model_validate(CHEAP))
    for step, body in applied:
        example = TrainingExample(messages=[{"role": "user", "content": body["prompt"]}],
                                  response_text=body["response"], feedback=body["feedback"])
        assert trainer.step(DistillBatch(lora_id=lora_id, examples=[example], training=training)).step == step
    served, replayed = _weights(store, lora_id), _weights(replay_store, lora_id)
    assert served.keys() == replayed.keys()
    worst = max(float((served[k] - replayed[k]).abs().max()) for k in served)
    moved = max(float((served[k] - load_file(str(initial / "adapter_model.safetensors"))[k]).abs().max())
                for k in served)
    print(f"two API processes: {FEEDBACKS} feedbacks, {len(applied)} applied, max |served - replay| = {worst:.2e}, "
          f"max |served - initial| = {moved:.2e}")
    assert moved > 1e-3  # the steps really moved the weights, so the equality below means something
    assert worst <= 1e-5
