"""Secrets and exposure (issue 8, finding 16): keys never print in clear; with keys set, the health details, the
OpenAPI schema and its docs page need a (admin) key."""

from __future__ import annotations

import httpx
import pytest
from typer.testing import CliRunner

from claas.cli import app as cli_app
from claas.core.config import get_settings

KEYS = "admin-secret-1,alice-secret-2:alice"


def test_claas_config_masks_every_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLAAS_API_KEYS", KEYS)
    monkeypatch.setenv("CLAAS_VLLM_API_KEY", "vllm-secret-3")
    monkeypatch.setenv("CLAAS_TINKER_API_KEY", "tml-secret-4")
    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(cli_app, ["config"], env={"COLUMNS": "400"})
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 0, result.output
    for secret in ("admin-secret-1", "alice-secret-2", "vllm-secret-3", "tml-secret-4"):
        assert secret not in result.output
    assert "CLAAS_API_KEYS" in result.output and "**********" in result.output


def test_health_docs_and_schema_need_a_key(make_gateway, fake_upstream) -> None:
    fake_upstream.on("GET", "/health", lambda r: httpx.Response(200))
    fake_upstream.on("GET", "/is_sleeping", lambda r: httpx.Response(200, json={"is_sleeping": False}))
    admin, alice = {"Authorization": "Bearer admin-secret-1"}, {"Authorization": "Bearer alice-secret-2"}
    with make_gateway(fake_upstream, api_keys=KEYS) as (client, _):
        for headers in ({}, {"Authorization": "Bearer wrong"}, alice):
            minimal = client.get("/v1/health", headers=headers)
            assert minimal.status_code == 200 and minimal.json() == {"status": "ok"}
        full = client.get("/v1/health", headers=admin).json()
        assert full["inference"]["url"] == "http://upstream.test" and "engine" in full
        for path in ("/openapi.json", "/docs", "/redoc"):
            assert client.get(path).status_code in (401, 404), path
        assert client.get("/openapi.json", headers=alice).json()["info"]["title"] == "CLaaS"
        assert "swagger" in client.get("/docs", headers=admin).text.lower()


def test_without_keys_docs_stay_open(make_gateway, fake_upstream) -> None:
    with make_gateway(fake_upstream) as (client, _):
        assert client.get("/openapi.json").status_code == 200 and client.get("/docs").status_code == 200


def test_a_sleeping_server_is_degraded(make_gateway, fake_upstream) -> None:
    fake_upstream.on("GET", "/health", lambda r: httpx.Response(200))
    fake_upstream.on("GET", "/is_sleeping", lambda r: httpx.Response(200, json={"is_sleeping": True}))
    with make_gateway(fake_upstream) as (client, _):
        reply = client.get("/v1/health")
    assert reply.status_code == 503
    assert reply.json()["status"] == "degraded" and reply.json()["inference"]["sleeping"] is True
