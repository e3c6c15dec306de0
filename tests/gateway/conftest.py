"""Fixtures of the gateway tests: a small fake training engine, apps wired to an httpx MockTransport upstream, and
real uvicorn servers on free 127.0.0.1 ports in background threads."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from claas.api import build_app
from claas.core.config import Settings
from claas.core.types import DistillBatch, DistillResult, LoraInfo, LoraInitRequest, LoraRuntimeRef
from claas.deps import get_inference
from claas.inference.vllm import VllmClient
from claas.training.engine.base import TrainingEngine

FAKE_UPSTREAM = "http://upstream.test"


class FakeEngine(TrainingEngine):
    """Knows a fixed set of adapters (id -> path); records calls. No training."""

    kind = "fake"
    shares_inference_device = False

    def __init__(self, adapters: dict[str, str] | None = None) -> None:
        self.adapters = dict(adapters or {})
        self.calls: list[tuple[str, Any]] = []
        self.closed = False

    async def warmup(self) -> None:
        self.calls.append(("warmup", None))

    async def distill(self, batch: DistillBatch) -> DistillResult:
        self.calls.append(("distill", batch))
        return DistillResult(lora_id=batch.lora_id, step=1, metrics={}, timing_ms={})

    async def init_lora(self, request: LoraInitRequest) -> LoraInfo:
        raise NotImplementedError

    async def list_loras(self, prefix: str = "") -> list[LoraInfo]:
        return []

    async def export_lora(self, lora_id: str) -> bytes:
        raise NotImplementedError

    async def delete_lora(self, lora_id: str) -> None:
        self.adapters.pop(lora_id, None)

    async def lora_exists(self, lora_id: str) -> bool:
        self.calls.append(("lora_exists", lora_id))
        return lora_id in self.adapters

    async def lora_runtime_ref(self, lora_id: str) -> LoraRuntimeRef:
        self.calls.append(("lora_runtime_ref", lora_id))
        return LoraRuntimeRef(name=lora_id, path=self.adapters[lora_id])

    async def health(self) -> dict[str, Any]:
        return {"ok": True}

    async def close(self) -> None:
        self.closed = True


def gateway_settings(tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "vllm_base_url": FAKE_UPSTREAM,
        "lora_root": tmp_path / "loras",
        "feedback_log_dir": tmp_path / "feedback",
        "model_cache": tmp_path / "models",
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


def real_stack_settings(model_server: Any, trainer: Any, root: Path, **overrides: Any) -> Settings:
    """Settings for a gateway on the session's real model server and resident trainer (logs and evals under root)."""
    values: dict[str, Any] = {
        "vllm_base_url": model_server.base_url,
        "lora_root": trainer.store.root,
        "feedback_log_dir": root / "feedback",
        "eval_dir": root / "evals",
        "model_cache": trainer._cache_dir,
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


Handler = Callable[[httpx.Request], httpx.Response]


class FakeUpstream:
    """An httpx MockTransport handler: answers per (method, path) from `routes`, records every request."""

    def __init__(self) -> None:
        self.routes: dict[tuple[str, str], Handler | list[Handler]] = {}
        self.requests: list[httpx.Request] = []

    def on(self, method: str, path: str, *handlers: Handler) -> None:
        """Answer with the handlers in turn (the last one repeats)."""
        self.routes[(method, path)] = list(handlers)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        handlers = self.routes.get((request.method, request.url.path))
        if not handlers:
            return httpx.Response(404, json={"error": {"message": "no route", "type": "NotFoundError", "code": 404}})
        assert isinstance(handlers, list)
        handler = handlers.pop(0) if len(handlers) > 1 else handlers[0]
        return handler(request)

    def bodies(self, path: str) -> list[dict[str, Any]]:
        return [json.loads(r.content) for r in self.requests if r.url.path == path and r.content]


@pytest.fixture
def fake_upstream() -> FakeUpstream:
    return FakeUpstream()


@pytest.fixture
def make_gateway(tmp_path: Path):
    """`with make_gateway(handler, engine=..., **settings) as (client, app)`: the real app (lifespan included) whose
    inference client talks to `handler` instead of a server."""

    @contextlib.contextmanager
    def factory(
        handler: Handler, *, engine: FakeEngine | None = None, **settings: Any
    ) -> Generator[tuple[TestClient, FastAPI]]:
        app = build_app(gateway_settings(tmp_path, **settings), engine=engine or FakeEngine())
        upstream = VllmClient(FAKE_UPSTREAM, transport=httpx.MockTransport(handler))

        async def _inference() -> VllmClient:
            return upstream

        app.dependency_overrides[get_inference] = _inference
        with TestClient(app, raise_server_exceptions=False) as client:
            yield client, app

    return factory


@pytest.fixture
def fake_engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def make_engine() -> type[FakeEngine]:
    return FakeEngine


@pytest.fixture
def make_settings(tmp_path: Path) -> Callable[..., Settings]:
    return lambda **overrides: gateway_settings(tmp_path, **overrides)


@pytest.fixture
def unused_port(free_port_factory: Callable[[], int]) -> Callable[[], int]:
    return free_port_factory


@pytest.fixture
def threaded_server(threaded_uvicorn: Any) -> Any:
    return threaded_uvicorn


@dataclass
class LiveGateway:
    base_url: str
    app: FastAPI
    engine: FakeEngine
    upstream_url: str
    model: str


@pytest.fixture(scope="session")
def live_gateway(model_server, threaded_uvicorn, tmp_path_factory) -> Iterator[LiveGateway]:
    """The gateway as a real uvicorn server on a free 127.0.0.1 port in front of the real model server, with a fake
    training engine (the proxy needs only `lora_exists` / `lora_runtime_ref`)."""
    engine = FakeEngine()
    settings = gateway_settings(tmp_path_factory.mktemp("gateway"), vllm_base_url=model_server.base_url)
    app = build_app(settings, engine=engine)
    with threaded_uvicorn(app) as server:
        yield LiveGateway(server.base_url, app, engine, model_server.base_url, model_server.model)
