"""A non-streamed request whose client leaves is cancelled upstream (issue 8, finding 8): the model server stops
generating instead of finishing an answer nobody reads. Real gateway, real model server."""

from __future__ import annotations

import socket
import time
from typing import Any
from urllib.parse import urlparse

import httpx
import pytest

pytestmark = pytest.mark.slow

MAX_TOKENS = 3000


def _running_and_generated(url: str) -> tuple[float, float]:
    """(requests running, generation tokens so far) from the server's Prometheus /metrics."""
    text = httpx.get(f"{url}/metrics", timeout=60).text

    def total(name: str) -> float:
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))

    return total("vllm:num_requests_running"), total("vllm:generation_tokens_total")


def test_a_client_that_leaves_stops_the_generation(live_gateway: Any) -> None:
    gw = live_gateway
    _, generated_before = _running_and_generated(gw.upstream_url)
    body = httpx.Request("POST", f"{gw.base_url}/v1/chat/completions", json={
        "model": gw.model, "max_tokens": MAX_TOKENS, "ignore_eos": True, "temperature": 0,
        "messages": [{"role": "user", "content": "Count to ten thousand."}]}).read()
    target = urlparse(gw.base_url)
    with socket.create_connection((target.hostname, target.port)) as sock:  # a client that sends, then leaves
        head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {target.netloc}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        sock.sendall(head + body)
        deadline = time.monotonic() + 60
        while _running_and_generated(gw.upstream_url)[0] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)  # until the server is generating for us
    deadline = time.monotonic() + 60
    while _running_and_generated(gw.upstream_url)[0] > 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    running, generated_after = _running_and_generated(gw.upstream_url)
    assert running == 0
    assert generated_after - generated_before < MAX_TOKENS  # stopped early, not run to max_tokens
