"""Session fixtures shared by every test package.

- `model_cache_dir`: where converted models live (`CLAAS_MODEL_CACHE`, else the settings' default), so the one-time
  GGUF → safetensors conversion is reused across runs.
- `model_server`: ONE `python -m claas.modelserver --model smollm2-135m` subprocess on a free 127.0.0.1 port for the
  whole session (real model, vLLM's HTTP API). Its output goes to a log file that is printed when it fails to start
  and attached to the report of any failing test that used it. Tests that load adapters or put it to sleep must use
  unique adapter names and leave it awake.
- `lora_adapter_dir`: a PEFT LoRA adapter for SmolLM2 (rank 8 on q_proj/v_proj, seeded non-zero weights, so it
  measurably changes outputs), built once in a subprocess to keep the test process free of torch.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from claas.processes import ServiceStartError, free_port, stop_process, wait_until_healthy

MODEL = "smollm2-135m"
_STARTUP_TIMEOUT_S = 300.0  # first run converts the GGUF (~20 s); a busy CI box can be much slower


@dataclass(frozen=True)
class ModelServer:
    base_url: str  # e.g. "http://127.0.0.1:PORT" (no /v1)
    model: str  # the served model id
    log_path: Path
    process: subprocess.Popen

    @property
    def v1(self) -> str:
        return f"{self.base_url}/v1"

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


@pytest.fixture(scope="session")
def model_cache_dir() -> Path:
    env = os.environ.get("CLAAS_MODEL_CACHE")
    if env:
        return Path(env).expanduser()
    from claas.core.config import get_settings

    return get_settings().model_cache


@pytest.fixture(scope="session")
def model_server(model_cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModelServer]:
    port = free_port()
    log_path = tmp_path_factory.mktemp("model-server") / "server.log"
    cmd = [
        sys.executable,
        "-m",
        "claas.modelserver",
        "--model",
        MODEL,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--cache-dir",
        str(model_cache_dir),
        # Pinned: tests compare the server's logprobs with the float32 trainer's (exact on-policy data).
        "--dtype",
        "float32",
    ]
    env = {**os.environ, "CLAAS_MODEL_CACHE": str(model_cache_dir)}
    with log_path.open("wb") as log:
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    server = ModelServer(base_url=f"http://127.0.0.1:{port}", model=MODEL, log_path=log_path, process=process)
    try:
        wait_until_healthy(f"{server.base_url}/health", process, name="model server", timeout_s=_STARTUP_TIMEOUT_S)
    except ServiceStartError as exc:
        stop_process(process)
        pytest.fail(f"{exc}:\n{server.log_tail(200)}")
    try:
        yield server
    finally:
        stop_process(process)


_ADAPTER_SCRIPT = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    import torch
    from peft import LoraConfig, get_peft_model

    from claas.core.models import load_model

    out, cache = sys.argv[1], Path(sys.argv[2])
    loaded = load_model("smollm2-135m", cache, device="cpu")
    torch.manual_seed(1234)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                        task_type="CAUSAL_LM")
    get_peft_model(loaded.model, config).save_pretrained(out)
    """
)


@pytest.fixture(scope="session")
def lora_adapter_dir(model_cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("lora-adapter") / "smollm2-r8"
    result = subprocess.run(
        [sys.executable, "-c", _ADAPTER_SCRIPT, str(out), str(model_cache_dir)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if result.returncode != 0 or not (out / "adapter_config.json").is_file():
        pytest.fail(f"building the test LoRA adapter failed:\n{result.stdout}\n{result.stderr}")
    return out


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    server = getattr(item, "funcargs", {}).get("model_server")
    if report.failed and isinstance(server, ModelServer):
        report.sections.append(("model server log (tail)", server.log_tail()))
    return report
