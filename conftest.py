"""Root fixtures shared by every test package (tests/conftest.py holds the model-server fixtures).

- `trainer`: ONE resident DistillationTrainer (the real SmolLM2 model) for the whole session, on a temporary store.
- `threaded_uvicorn`: run an ASGI app as a real uvicorn server on a free 127.0.0.1 port in a background thread.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from claas.processes import free_port


class ThreadedServer:
    """A real uvicorn server for an ASGI app, in a background thread with its own event loop."""

    def __init__(self, app: Any, port: int | None = None) -> None:
        self.port = port or free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ThreadedServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"uvicorn on port {self.port} did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="session")
def threaded_uvicorn() -> type[ThreadedServer]:
    return ThreadedServer


@pytest.fixture(scope="session")
def free_port_factory() -> Any:
    return free_port


@pytest.fixture(scope="session")
def trainer_store(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from claas.training.storage import LoraStore

    return LoraStore(tmp_path_factory.mktemp("loras"))


@pytest.fixture(scope="session")
def trainer(trainer_store: Any) -> Any:
    from claas.core.config import get_settings
    from claas.training.trainer import DistillationTrainer

    trainer = DistillationTrainer(
        base_model="smollm2-135m", store=trainer_store, cache_dir=Path(get_settings().model_cache), hot_adapters=4
    )
    trainer.ensure_loaded()
    return trainer
