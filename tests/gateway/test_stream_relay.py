"""True streaming through a real gateway (uvicorn, 127.0.0.1) in front of a slow scripted SSE server: chunks arrive
while the server is still generating, and a client disconnect closes the upstream request."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Route

from claas.api import build_app
from claas.inference.helpers import SseParser, sse_event

CHUNKS = 60
INTERVAL_S = 0.02


class SlowUpstream:
    """Streams CHUNKS chat chunks, one every INTERVAL_S; records whether the stream ran to its end."""

    def __init__(self) -> None:
        self.finished_at: float | None = None
        self.aborted = threading.Event()
        self.sent = 0
        self.app = Starlette(routes=[Route("/v1/chat/completions", self.chat, methods=["POST"])])

    async def chat(self, request: Request) -> StreamingResponse:
        await request.body()

        async def events():
            completed = False
            try:
                for i in range(CHUNKS):
                    chunk = {
                        "id": "chatcmpl-slow",
                        "object": "chat.completion.chunk",
                        "model": "base",
                        "choices": [
                            {
                                "index": 0,
                                "delta": {"content": f"t{i} "},
                                "token_ids": [100 + i],
                                "logprobs": {"content": [{"token": f"t{i}", "logprob": -0.1}]},
                                "finish_reason": "length" if i == CHUNKS - 1 else None,
                            }
                        ],
                    }
                    if i == 0:
                        chunk["prompt_token_ids"] = [1, 2]
                    yield sse_event(chunk)
                    self.sent += 1
                    await asyncio.sleep(INTERVAL_S)
                yield b"data: [DONE]\n\n"
                completed = True
                self.finished_at = time.monotonic()
            finally:
                if not completed:
                    self.aborted.set()

        return StreamingResponse(events(), media_type="text/event-stream")


@pytest.fixture
def slow_gateway(make_settings, make_engine, threaded_server):
    upstream = SlowUpstream()
    with threaded_server(upstream.app) as up:
        app = build_app(make_settings(vllm_base_url=up.base_url), engine=make_engine())
        with threaded_server(app) as gw:
            yield upstream, gw, app


def test_first_chunk_arrives_while_the_server_is_still_generating(slow_gateway):
    upstream, gateway, app = slow_gateway
    arrivals = []
    payload = {"model": "base", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    with httpx.stream("POST", f"{gateway.base_url}/v1/chat/completions", json=payload, timeout=30) as response:
        parser = SseParser()
        for raw in response.iter_bytes():
            for data in parser.feed(raw):
                arrivals.append((time.monotonic(), data))
    assert arrivals[-1][1] == "[DONE]"
    assert len(arrivals) == CHUNKS + 1
    assert upstream.finished_at is not None
    assert arrivals[0][0] < upstream.finished_at  # relayed, not buffered
    assert app.state.cache.get("chatcmpl-slow").response_token_ids == [100 + i for i in range(CHUNKS)]


def test_client_disconnect_cancels_the_upstream_stream(slow_gateway):
    upstream, gateway, app = slow_gateway
    payload = {"model": "base", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    with httpx.stream("POST", f"{gateway.base_url}/v1/chat/completions", json=payload, timeout=30) as response:
        for _ in response.iter_bytes():
            break  # read the first bytes, then hang up
    # `aborted` is only set when the server's stream stops early, so a generous wait cannot hide a missing cancel
    assert upstream.aborted.wait(timeout=10), "upstream stream ran to its end"
    assert upstream.sent < CHUNKS
    assert app.state.cache.get("chatcmpl-slow") is None  # an abandoned answer is not cached
