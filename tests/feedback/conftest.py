"""The gateway with the REAL local engine (shared resident trainer) in front of the REAL model server, served by
uvicorn on a free 127.0.0.1 port. The engine records every batch it is asked to distill, and the gateway's inference
client records every call it makes to the model server (method + path), so tests can check order and token ids."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from claas.api import build_app
from claas.core.config import Settings
from claas.core.types import DistillBatch, DistillResult
from claas.deps import get_inference
from claas.inference.vllm import VllmClient
from claas.training.engine.local import LocalEngine
from claas.training.trainer import DistillationTrainer


class RecordingEngine(LocalEngine):
    """The real local engine; remembers the batches it trained on."""

    def __init__(self, settings: Settings, trainer: DistillationTrainer) -> None:
        super().__init__(settings, trainer=trainer)
        self.batches: list[DistillBatch] = []

    async def distill(self, batch: DistillBatch) -> DistillResult:
        self.batches.append(batch)
        return await super().distill(batch)


class RecordingTransport(httpx.AsyncBaseTransport):
    """Forwards to the real server; logs (method, path) of every call in order."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.calls: list[tuple[str, str]] = []
        self.lock = threading.Lock()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        with self.lock:
            self.calls.append((request.method, request.url.path))
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()

    def paths(self, *, since: int = 0) -> list[str]:
        return [path for _, path in self.calls[since:]]


@dataclass
class FeedbackGateway:
    base_url: str
    app: FastAPI
    engine: RecordingEngine
    transport: RecordingTransport
    settings: Settings
    model_server_url: str
    base_model: str
    created: list[str] = field(default_factory=list)

    @property
    def v1(self) -> str:
        return f"{self.base_url}/v1"


@pytest.fixture(scope="session")
def feedback_gateway(
    model_server, trainer, threaded_uvicorn, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[FeedbackGateway]:
    root: Path = tmp_path_factory.mktemp("feedback-gateway")
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        vllm_base_url=model_server.base_url,
        lora_root=trainer.store.root,
        feedback_log_dir=root / "feedback",
        model_cache=trainer._cache_dir,
        feedback_lock_timeout_s=300.0,
        sleep_during_training="always",  # exercise the sleep/wake path on CPU too (auto would not sleep here)
    )
    engine = RecordingEngine(settings, trainer)
    transport = RecordingTransport()
    client = VllmClient(model_server.base_url, transport=transport)
    app = build_app(settings, engine=engine)

    async def _inference() -> VllmClient:
        return client

    app.dependency_overrides[get_inference] = _inference
    with threaded_uvicorn(app) as server:
        yield FeedbackGateway(server.base_url, app, engine, transport, settings, model_server.base_url,
                              model_server.model)
