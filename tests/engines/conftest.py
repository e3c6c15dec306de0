"""Fixtures of the engine tests: ONE fake Tinker cloud on the real SmolLM2 for the session, and engines on it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from tinker_fakes import BASE, FakeRestClient, FakeServiceClient, FakeTinkerCloud, tinker_settings


@pytest.fixture(scope="session")
def tinker_cloud(model_cache_dir: Path) -> FakeTinkerCloud:
    from claas.core.models import load_model

    loaded = load_model(BASE, model_cache_dir, "cpu")
    for param in loaded.model.parameters():
        param.requires_grad_(False)
    return FakeTinkerCloud(loaded, BASE)


@pytest.fixture
def make_tinker_engine(tinker_cloud: FakeTinkerCloud, tmp_path: Path) -> Callable[..., Any]:
    """`make_tinker_engine(root=None)`: a TinkerEngine on the fake cloud; engines sharing `root` are replicas."""
    from claas.training.engine.tinker import TinkerEngine

    def make(root: Path | None = None) -> TinkerEngine:
        settings = tinker_settings(root or tmp_path)
        http = httpx.AsyncClient(transport=httpx.MockTransport(tinker_cloud.serve_file))
        return TinkerEngine(settings, service=FakeServiceClient(tinker_cloud), rest=FakeRestClient(tinker_cloud),
                            http=http)

    return make
