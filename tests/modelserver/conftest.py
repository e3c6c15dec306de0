"""Clients of the session's real model server (tests/conftest.py starts it once)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest


@pytest.fixture(scope="module")
def http(model_server: Any) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=model_server.base_url, timeout=120.0) as client:
        yield client


@pytest.fixture(scope="module")
def oai(model_server: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=model_server.v1, api_key="EMPTY", timeout=120.0, max_retries=0)
