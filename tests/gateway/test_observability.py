"""Observability (issue 8): /metrics counts requests and latency by route and status and shows the sleep state, the
cache's bytes and the adapter locks in use; every request has an id (X-Request-ID, the caller's when safe) that
every log line emitted for it carries, as one JSON object per line."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from claas.logs import JsonFormatter, RequestIdFilter, log_config

MODELS = {"object": "list", "data": [{"id": "base", "object": "model", "parent": None, "max_model_len": 2048}]}


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample of the Prometheus text exposition."""
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        found = dict(re.findall(r'(\w+)="([^"]*)"', head))
        if head.split("{")[0] == name and found == labels:
            return float(value)
    raise AssertionError(f"no sample {name}{labels} in /metrics")


@pytest.fixture
def json_lines() -> Iterator[io.StringIO]:
    """The claas and uvicorn loggers write JSON lines (the `claas api` format) into a buffer."""
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RequestIdFilter())
    loggers = [logging.getLogger("claas")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.INFO)
    try:
        yield buffer
    finally:
        for lg, level in zip(loggers, levels):
            lg.removeHandler(handler)
            lg.setLevel(level)


def test_metrics_count_requests_by_route_and_status(make_gateway, fake_upstream) -> None:
    fake_upstream.on("GET", "/v1/models", lambda request: httpx.Response(200, json=MODELS))
    with make_gateway(fake_upstream) as (client, app):
        for _ in range(3):
            assert client.get("/v1/models").status_code == 200
        assert client.get("/v1/nowhere").status_code == 404
        text = client.get("/metrics").text
    assert metric(text, "claas_http_requests_total", method="GET", route="/v1/models", status="200") == 3
    assert metric(text, "claas_http_requests_total", method="GET", route="unmatched", status="404") == 1
    assert metric(text, "claas_http_request_duration_seconds_count", method="GET", route="/v1/models") == 3
    assert metric(text, "claas_inference_sleeping") == 0
    assert metric(text, "claas_lora_locks_in_use") == 0
    assert metric(text, "claas_completion_cache_bytes") == 0


class StubServer:
    """Just what SleepCoordinator calls on an inference backend."""

    async def wait_until_idle(self, timeout_s: float) -> None:
        return None

    async def sleep(self, level: int) -> None:
        return None

    async def wake_up(self) -> None:
        return None


def test_the_sleep_gauge_follows_the_coordinator(make_gateway, fake_upstream) -> None:
    with make_gateway(fake_upstream) as (client, app):
        stub: Any = StubServer()
        asyncio.run(app.state.sleep.acquire(stub, level=1, drain_timeout_s=1))
        asleep = client.get("/metrics").text
        asyncio.run(app.state.sleep.release(stub))
        awake = client.get("/metrics").text
    assert metric(asleep, "claas_inference_sleeping") == 1 and metric(asleep, "claas_inference_sleep_holders") == 1
    assert metric(awake, "claas_inference_sleeping") == 0 and metric(awake, "claas_inference_sleep_holders") == 0


@pytest.mark.parametrize(
    "sent, kept",
    [("trace-abc_123.4", True), ("../../etc/passwd", False), ("x" * 65, False), (None, False)],
    ids=["safe", "traversal", "too-long", "absent"],
)
def test_every_response_carries_a_request_id(make_gateway, fake_upstream, sent: str | None, kept: bool) -> None:
    fake_upstream.on("GET", "/v1/models", lambda request: httpx.Response(200, json=MODELS))
    headers = {"X-Request-ID": sent} if sent is not None else {}
    with make_gateway(fake_upstream) as (client, app):
        reply = client.get("/v1/models", headers=headers)
    request_id = reply.headers["x-request-id"]
    if kept:
        assert request_id == sent
    else:
        assert re.fullmatch(r"[0-9a-f]{32}", request_id)


def test_every_log_line_of_a_request_is_json_with_its_id(make_gateway, fake_upstream, json_lines) -> None:
    """An upstream 500 logs its text (server side) and the error; each line names the request it belongs to."""
    fake_upstream.on("POST", "/v1/chat/completions",
                     lambda request: httpx.Response(500, json={"error": {"message": "CUDA error: boom"}}))
    chat = {"model": "base", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    with make_gateway(fake_upstream) as (client, app):
        first = client.post("/v1/chat/completions", json=chat, headers={"X-Request-ID": "req-one"})
        second = client.post("/v1/chat/completions", json=chat)
    assert first.status_code >= 500 and second.status_code >= 500
    lines = [json.loads(line) for line in json_lines.getvalue().splitlines()]
    lines = [line for line in lines if "ready" not in line["message"]]  # the start-up line belongs to no request
    by_request = {line["request_id"] for line in lines}
    assert by_request == {"req-one", second.headers["x-request-id"]}, lines
    ours = [line for line in lines if line["request_id"] == "req-one"]
    assert any("CUDA error: boom" in line["message"] for line in ours)  # the upstream text is in the log only
    assert "CUDA error" not in first.text
    assert all({"time", "level", "logger", "message"} <= set(line) for line in lines)


def test_the_api_log_config_formats_uvicorn_lines_as_json_too() -> None:
    config = log_config("info", "json")
    assert config["formatters"]["claas"] == {"()": JsonFormatter}
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        assert config["loggers"][name]["propagate"] is True  # to the root's JSON handler
    assert "%(request_id)s" in log_config("info", "text")["formatters"]["claas"]["format"]
