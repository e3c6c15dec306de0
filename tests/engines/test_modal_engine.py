"""The Modal engine without Modal's cloud: claas.deploy imports offline, the worker body trains SmolLM2 on a Volume
view, the engine reaches it through an in-process lookup, the Volume store keeps Modal's reload/commit contract,
and Modal's errors become 503s that say what to do."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import httpx
import modal.exception
import pytest
from fastapi.testclient import TestClient
from modal_fakes import FolderVolume, InProcessWorker

from claas.api import build_app
from claas.core.config import Settings
from claas.core.types import DistillBatch, LoraInitRequest, TrainingConfig, TrainingExample
from claas.deps import get_inference
from claas.inference.vllm import VllmClient
from claas.training.engine.modal import ModalEngine
from claas.training.engine.remote_errors import RemoteEngineError
from claas.training.storage import LoraMetadata, LoraStore
from claas.training.volume_store import VolumeLoraStore

ROOT = Path(__file__).resolve().parents[2]


def _settings(root: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {"training_engine": "modal", "lora_root": root, "feedback_log_dir": root.parent / "fb",
                              "lora_rank": 8, "lora_alpha": 16, "device": "cpu"}
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


def test_deploy_module_imports_without_network(tmp_path: Path) -> None:
    """A dead Modal server URL and no token: importing still succeeds (every Modal object is lazy)."""
    env = {**os.environ, "MODAL_SERVER_URL": "http://127.0.0.1:9", "MODAL_TOKEN_ID": "", "MODAL_TOKEN_SECRET": "",
           "HOME": str(tmp_path)}
    code = (
        "import claas.deploy as d; "
        "print(d.app.name, d.DistillWorker.__name__, d.LORA_ROOT, sorted(d.worker_env(d.Settings()))[:2])"
    )
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120,
                            cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[:3] == ["claas", "DistillWorker", "/loras"]
    assert time.monotonic() - started < 120


def test_the_image_installs_the_versions_pyproject_pins() -> None:
    from claas.deploy import pinned_requirements

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = pinned_requirements()
    assert "torch==2.13.0" in requirements
    assert set(project["dependencies"]) <= set(requirements)
    assert set(project["optional-dependencies"]["modal"]) <= set(requirements)


def _dummy_adapter(directory: Path) -> None:
    (directory / "adapter_config.json").write_text("{}")
    (directory / "adapter_model.safetensors").write_bytes(b"weights")


def test_volume_store_keeps_modals_reload_commit_contract(tmp_path: Path) -> None:
    shared = tmp_path / "volume"
    worker_view, gateway_view = FolderVolume(shared, tmp_path / "worker"), FolderVolume(shared, tmp_path / "gateway")
    worker = VolumeLoraStore(worker_view.view, worker_view)
    gateway = VolumeLoraStore(gateway_view.view, gateway_view)
    meta = LoraMetadata(lora_id="a/x", base_model="m", rank=8, alpha=16, target_modules=["q_proj"])

    LoraStore.create(worker, "a/x", _dummy_adapter, meta)  # written but not committed: invisible elsewhere
    assert not gateway.exists("a/x")
    worker_view.commit()
    assert gateway.exists("a/x")  # the read reloaded first
    reloads = gateway_view.reloads
    assert [e.lora_id for e in gateway.list()] == ["a/x"] and gateway_view.reloads == reloads + 1  # one per call

    commits = worker_view.commits
    worker.save("a/x", _dummy_adapter, meta)  # a public write commits after itself
    assert worker_view.commits == commits + 1
    assert (shared / "a" / "x").is_symlink()  # same atomic layout as the local store: a link to a snapshot
    gateway.delete("a/x")
    assert not worker.exists("a/x")


@pytest.mark.slow
def test_worker_body_trains_and_the_engine_reaches_it(tmp_path: Path, model_cache_dir: Path) -> None:
    from claas.training.engine.modal_worker import DistillWorkerCore

    shared = tmp_path / "volume"
    worker_volume = FolderVolume(shared, tmp_path / "worker")
    gateway_volume = FolderVolume(shared, tmp_path / "gateway")
    core = DistillWorkerCore(_settings(worker_volume.view, model_cache=model_cache_dir), worker_volume)
    core.load()
    engine = ModalEngine(_settings(gateway_volume.view), worker=InProcessWorker(core), volume=gateway_volume)
    example = TrainingExample(messages=[{"role": "user", "content": "Who are you?"}],
                              response_text="I am an AI assistant.", feedback="Your name is Kuro.")

    async def run() -> tuple[Any, Any, list[Any], bytes]:
        info = await engine.init_lora(LoraInitRequest(lora_id="m/kuro"))
        assert await engine.lora_exists("m/kuro")  # written by the worker, seen here after commit + reload
        batch = DistillBatch(lora_id="m/kuro", examples=[example], training=TrainingConfig(learning_rate=1e-3))
        result = await engine.distill(batch)
        return info, result, await engine.list_loras("m/"), await engine.export_lora("m/kuro")

    info, result, listed, exported = asyncio.run(run())
    assert info.step == 0 and result.step == 1 and result.metrics["tokens"] > 0
    assert [(i.lora_id, i.step) for i in listed] == [("m/kuro", 1)]
    assert exported[:2] == b"PK"
    ref = asyncio.run(engine.lora_runtime_ref("m/kuro"))
    assert Path(ref.path).is_relative_to(gateway_volume.view) and (Path(ref.path) / "adapter_config.json").is_file()


class _Failing:
    def __init__(self, error: BaseException | None = None, delay: float = 0.0) -> None:
        self.error, self.delay = error, delay

    def distill(self, payload: dict[str, Any]) -> dict[str, Any]:
        time.sleep(self.delay)
        if self.error is not None:
            raise self.error
        return {}

    init_lora = distill


@pytest.mark.parametrize(
    ("error", "advice"),
    [
        (modal.exception.NotFoundError("Lookup failed for Cls 'DistillWorker' from the 'claas' app"),
         "modal deploy -m claas.deploy"),
        (modal.exception.AuthError("Token missing"), "modal token new"),
        (modal.exception.FunctionTimeoutError("timed out"), "CLAAS_MODAL_TIMEOUT_S"),
        (modal.exception.RemoteError("worker crashed"), "modal app logs"),
    ],
)
def test_modal_errors_are_503_saying_what_to_do(tmp_path: Path, error: BaseException, advice: str) -> None:
    volume = FolderVolume(tmp_path / "v", tmp_path / "view")
    engine = ModalEngine(_settings(volume.view), worker=InProcessWorker(_Failing(error)), volume=volume)
    meta = LoraMetadata(lora_id="m/x", base_model="smollm2-135m", rank=8, alpha=16, target_modules=["q_proj"])
    engine.store.create("m/x", _dummy_adapter, meta)
    app = build_app(_settings(volume.view), engine=engine)
    cards = {"object": "list", "data": [{"id": "smollm2-135m", "object": "model", "parent": None}]}
    upstream = VllmClient("http://vllm.test", transport=httpx.MockTransport(lambda r: httpx.Response(200, json=cards)))

    async def _inference() -> VllmClient:
        return upstream

    app.dependency_overrides[get_inference] = _inference
    with TestClient(app) as client:
        response = client.post("/v1/feedback", json={"lora_id": "m/x", "prompt": "Hi", "response": "Hello",
                                                     "feedback": "Say your name."})
    assert response.status_code == 503, response.text
    assert advice in response.json()["error"]["message"]


def test_a_worker_that_never_answers_is_a_503_after_the_timeout(tmp_path: Path) -> None:
    volume = FolderVolume(tmp_path / "v", tmp_path / "view")
    settings = _settings(volume.view, modal_timeout_s=0.2)
    engine = ModalEngine(settings, worker=InProcessWorker(_Failing(delay=1.0)), volume=volume)
    with pytest.raises(RemoteEngineError, match="CLAAS_MODAL_TIMEOUT_S"):
        asyncio.run(engine.init_lora(LoraInitRequest(lora_id="m/x")))
