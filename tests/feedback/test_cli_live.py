"""The `claas` CLI against a running gateway (real engine, real model server), and `claas up` as a user runs it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
import zipfile
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from claas.cli import app

pytestmark = pytest.mark.slow
runner = CliRunner()


def invoke(*args: str) -> Any:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result


def test_lora_lifecycle_and_feedback_through_the_cli(feedback_gateway: Any, tmp_path: Path) -> None:
    url = feedback_gateway.base_url
    lora_id = f"cli/{uuid.uuid4().hex[:8]}"
    assert "created" in invoke("lora", "init", lora_id, "--rank", "4", "--url", url).output
    listed = json.loads(invoke("lora", "list", "--prefix", lora_id, "--url", url, "--json").output)
    assert [lora["lora_id"] for lora in listed["loras"]] == [lora_id]

    body = tmp_path / "feedback.json"
    body.write_text(json.dumps({"lora_id": lora_id, "prompt": "Who are you?", "response": "I am SmolLM.",
                                "feedback": "Call yourself Kuro."}))
    reply = json.loads(invoke("feedback", "--file", str(body), "--url", url, "--json").output)
    assert reply["status"] == "ok" and reply["distill_result"]["step"] == 1
    flags = invoke("feedback", "--lora-id", lora_id, "--prompt", "Who are you?", "--response", "I am SmolLM.",
                   "--feedback", "Call yourself Kuro.", "--url", url)
    assert f"{lora_id} step 2" in flags.output

    archive = tmp_path / "a.zip"
    invoke("lora", "export", lora_id, "-o", str(archive), "--url", url)
    assert "adapter_model.safetensors" in zipfile.ZipFile(archive).namelist()
    invoke("lora", "delete", lora_id, "--url", url)
    missing = runner.invoke(app, ["lora", "export", lora_id, "--url", url])
    assert missing.exit_code == 1 and "404" in missing.output


def test_claas_up_serves_and_stops_cleanly(model_cache_dir: Path, free_port_factory: Any, tmp_path: Path) -> None:
    api_port, model_port = free_port_factory(), free_port_factory()
    env = {**os.environ, "CLAAS_MODEL_CACHE": str(model_cache_dir), "CLAAS_LORA_ROOT": str(tmp_path / "loras"),
           "CLAAS_FEEDBACK_LOG_DIR": str(tmp_path / "feedback")}
    log = (tmp_path / "up.log").open("w+")
    process = subprocess.Popen(
        [sys.executable, "-m", "claas", "up", "--port", str(api_port), "--model-port", str(model_port)],
        stdout=log, stderr=subprocess.STDOUT, env=env,
    )
    try:
        deadline = time.monotonic() + 300
        while "ready" not in (tmp_path / "up.log").read_text():
            assert process.poll() is None, (tmp_path / "up.log").read_text()
            assert time.monotonic() < deadline, "claas up did not get ready"
            time.sleep(0.5)
        reply = httpx.post(f"http://127.0.0.1:{api_port}/v1/chat/completions", timeout=300, json={
            "model": "smollm2-135m", "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "temperature": 0, "max_tokens": 12})
        assert "Paris" in reply.json()["choices"][0]["message"]["content"]
        assert httpx.get(f"http://127.0.0.1:{api_port}/v1/health", timeout=30).json()["inference"]["reachable"]
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
    for port in (api_port, model_port):  # both children are gone, not just the parent
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
