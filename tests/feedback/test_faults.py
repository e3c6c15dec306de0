"""Faults (issue 8 proof), on the real gateway + engine and this module's OWN model server process (so it can be
killed and started again on the same port without disturbing the session's):

- the inference server killed mid-stream: the client's stream ends with an in-band error event (code 502/503) that
  names the server, not a hang or a silent cut; the next request, before it returns, is a 503 naming the URL;
- the inference server killed mid-feedback (during the step, while asleep for it): the step is saved, the answer is
  503 "saved ... not served" with Retry-After (not a generic error a client would retry into a second step), the
  feedback log records `saved_not_served`, the adapter on disk is intact, and once the server returns the adapter
  is served again (loaded on first use);
- an engine exception: 500 naming the phase, never the exception text, and a server log record with the request id;
- the API restarted (a new process-like app with a fresh engine on the same root, the model server restarted too):
  every adapter, version and alias is listed and served.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from claas.api import build_app
from claas.core.config import Settings
from claas.core.types import DistillBatch, DistillResult
from claas.processes import free_port, stop_process, wait_until_healthy
from claas.training.engine.local import LocalEngine

pytestmark = pytest.mark.slow

HTTP = httpx.Client(timeout=900)
CHEAP = {"learning_rate": 1e-3, "teacher_demonstration": False}


@dataclass
class OwnServer:
    """A model server process of this module, restartable on the same port."""

    port: int
    cache: Path
    log: Path
    process: subprocess.Popen | None = None
    starts: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        cmd = [sys.executable, "-m", "claas.modelserver", "--model", "smollm2-135m", "--host", "127.0.0.1",
               "--port", str(self.port), "--cache-dir", str(self.cache)]
        with self.log.open("ab") as handle:
            self.process = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT,
                                            env={**os.environ, "CLAAS_MODEL_CACHE": str(self.cache)})
        self.starts += 1
        wait_until_healthy(f"{self.url}/health", self.process, name="model server", timeout_s=600)

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait(30)

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)


class KillingEngine(LocalEngine):
    """The real local engine; `kill_during_step` kills the model server while the next step runs."""

    kill_during_step: OwnServer | None = None
    fail_with: BaseException | None = None

    async def distill(self, batch: DistillBatch) -> DistillResult:
        if self.fail_with is not None:
            raise self.fail_with
        if self.kill_during_step is not None:
            server, self.kill_during_step = self.kill_during_step, None
            server.kill()
        return await super().distill(batch)


@dataclass
class Faults:
    server: OwnServer
    settings: Settings
    engine: KillingEngine
    base_url: str
    created: list[str] = field(default_factory=list)

    @property
    def v1(self) -> str:
        return f"{self.base_url}/v1"

    def new_lora(self) -> str:
        lora_id = f"faults/{uuid.uuid4().hex[:8]}"
        reply = HTTP.post(f"{self.v1}/lora/init", json={"lora_id": lora_id, "lora_r": 2, "lora_alpha": 4})
        assert reply.status_code == 200, reply.text
        self.created.append(lora_id)
        return lora_id


@pytest.fixture(scope="module")
def faults(model_cache_dir: Path, trainer: Any, threaded_uvicorn: Any, tmp_path_factory: Any) -> Iterator[Faults]:
    root = tmp_path_factory.mktemp("faults")
    server = OwnServer(free_port(), model_cache_dir, root / "model-server.log")
    server.start()
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        vllm_base_url=server.url,
        lora_root=trainer.store.root,  # the session's resident trainer and its root (ids here are unique)
        feedback_log_dir=root / "feedback",
        model_cache=model_cache_dir,
        feedback_lock_timeout_s=300.0,
        sleep_during_training="always",  # the GPU path: the server is asleep for the step when it dies
    )
    engine = KillingEngine(settings, trainer=trainer)
    app = build_app(settings, engine=engine)
    try:
        with threaded_uvicorn(app) as gateway:
            yield Faults(server, settings, engine, gateway.base_url)
    finally:
        server.stop()


def _feedback(f: Faults, lora_id: str, **extra: Any) -> httpx.Response:
    return HTTP.post(f"{f.v1}/feedback", json={"lora_id": lora_id, "prompt": "Hi! Who are you?",
                                               "response": "I am SmolLM.", "feedback": "Say Kuro.",
                                               "training": CHEAP}, **extra)


def _chat(f: Faults, model: str) -> httpx.Response:
    return HTTP.post(f"{f.v1}/chat/completions", json={
        "model": model, "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]})


def test_the_server_killed_mid_stream_ends_the_stream_with_an_error_event(faults: Faults) -> None:
    body = {"model": "smollm2-135m", "max_tokens": 400, "ignore_eos": True, "stream": True,
            "messages": [{"role": "user", "content": "Count to one thousand."}]}
    events: list[dict[str, Any]] = []
    with HTTP.stream("POST", f"{faults.v1}/chat/completions", json=body) as reply:
        assert reply.status_code == 200
        for line in reply.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            events.append(json.loads(line[len("data: "):]))
            if len(events) == 3:
                faults.server.kill()
    assert len(events) > 3, "the stream ended without a word"
    error = events[-1].get("error")
    assert error is not None, events[-1]  # the stream says what happened, in-band (its status was sent already)
    assert error["code"] in (502, 503) and faults.server.url in error["message"]
    down = _chat(faults, "smollm2-135m")
    assert down.status_code == 503 and faults.server.url in down.json()["error"]["message"]
    faults.server.start()
    assert _chat(faults, "smollm2-135m").status_code == 200


def test_the_server_killed_mid_feedback_is_saved_not_served_then_served_on_return(faults: Faults) -> None:
    lora_id = faults.new_lora()
    store = faults.engine.store
    faults.engine.kill_during_step = faults.server
    reply = _feedback(faults, lora_id, headers={"Idempotency-Key": f"kill-{lora_id}"})
    assert reply.status_code == 503, reply.text
    assert reply.headers.get("retry-after")
    message = reply.json()["error"]["message"]
    assert "saved (step 1)" in message and "Idempotency-Key" in message  # what happened and what to do
    assert store.read_metadata(lora_id).step == 1  # the step is on disk, complete
    records = [json.loads(p.read_text()) for p in faults.settings.feedback_log_dir.rglob("*.json")]
    (record,) = [r for r in records if r.get("lora_id") == lora_id]  # (idempotency records have none)
    assert record["status"] == "saved_not_served"
    faults.server.start()  # the server returns (a fresh process: awake, without the adapter)
    retry = _feedback(faults, lora_id, headers={"Idempotency-Key": f"kill-{lora_id}"})
    assert retry.status_code == 200, retry.text  # the keyed retry reloads only ...
    assert store.read_metadata(lora_id).step == 1  # ... and trains nothing
    assert HTTP.get(f"{faults.server.url}/is_sleeping").json() == {"is_sleeping": False}
    served = _chat(faults, lora_id)
    assert served.status_code == 200 and served.json()["model"] == lora_id


def test_an_engine_exception_is_500_naming_the_phase_with_a_log_record(
    faults: Faults, caplog: pytest.LogCaptureFixture
) -> None:
    lora_id = faults.new_lora()
    before = {p.name: p.read_bytes() for p in faults.engine.store.snapshot_path(lora_id).iterdir()}
    faults.engine.fail_with = RuntimeError("CUDA error: device-side assert at /secret/path.py")
    try:
        with caplog.at_level(logging.ERROR, logger="claas.feedback"):
            reply = _feedback(faults, lora_id, headers={"X-Request-ID": f"boom-{lora_id[-8:]}"})
    finally:
        faults.engine.fail_with = None
    assert reply.status_code == 500
    error = reply.json()["error"]
    assert "phase 'distill' failed" in error["message"] and "secret" not in error["message"]
    assert f"boom-{lora_id[-8:]}" in error["message"]  # the reference to find the log record
    (record,) = [r for r in caplog.records if f"boom-{lora_id[-8:]}" in r.getMessage()]
    assert record.exc_info is not None and "distill" in record.getMessage()  # the traceback is in the log
    assert {p.name: p.read_bytes() for p in faults.engine.store.snapshot_path(lora_id).iterdir()} == before
    assert HTTP.get(f"{faults.server.url}/is_sleeping").json() == {"is_sleeping": False}


def test_after_a_restart_every_adapter_is_listed_and_served(faults: Faults, threaded_uvicorn: Any) -> None:
    first = faults.new_lora()
    assert _feedback(faults, first).status_code == 200
    distilled = HTTP.post(f"{faults.v1}/distill", json={"lora_id": first, "prompt": "Hi", "response": "Hello.",
                                                       "feedback": "Say Kuro.", "training": CHEAP})
    assert distilled.status_code == 200, distilled.text
    version = distilled.json()["distill_result"]["lora_id"]
    expected = {*faults.created, version, f"{first}@latest"}
    # The model server restarts too (it forgets every loaded adapter); the API comes back with a fresh engine
    # built from the settings (its own resident model), on the same adapter root.
    faults.server.stop()
    faults.server.start()
    app = build_app(faults.settings.model_copy(update={"sleep_during_training": "auto"}))
    with threaded_uvicorn(app) as restarted:
        listed = HTTP.get(f"{restarted.base_url}/v1/lora", params={"prefix": "faults/"}).json()["loras"]
        names = {lora["lora_id"] for lora in listed} | {alias for lora in listed for alias in lora["aliases"]}
        assert expected <= names, expected - names
        for model in sorted(expected):
            reply = HTTP.post(f"{restarted.base_url}/v1/chat/completions", json={
                "model": model, "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]})
            assert reply.status_code == 200, f"{model}: {reply.text}"
            assert reply.json()["model"] == model

