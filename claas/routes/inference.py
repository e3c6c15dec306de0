"""OpenAI-compatible routes: chat and text completions (JSON or SSE), models, and `/v1/score`.

Thin: parse, call the proxy (claas.inference.proxy), pick JSONResponse or an SSE stream. Every reply carries
`X-Claas-Completion-Id` (the id feedback can refer to); `X-Claas-Strip-Thinking: 1` removes `<think>` blocks.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import TypeVar

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from claas.deps import AuthDep, ProxyDep
from claas.inference.proxy import JsonReply, StreamReply
from claas.inference.wire import ChatCompletionRequest, CompletionRequest, ScoreRequest

logger = logging.getLogger(__name__)

router = APIRouter(tags=["inference"])

T = TypeVar("T")

COMPLETION_ID_HEADER = "X-Claas-Completion-Id"
STRIP_THINKING_HEADER = "X-Claas-Strip-Thinking"


class SseResponse(StreamingResponse):
    """A server-sent-event stream that notices a client disconnect at once (not only at the next write) and always
    closes its body iterator, which closes the upstream response and so cancels the generation upstream."""

    media_type = "text/event-stream"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as group:

                async def stream() -> None:
                    try:
                        await self.stream_response(send)
                    except OSError:
                        logger.debug("client disconnected while streaming")
                    except Exception:  # the response has started: the status can no longer change, only stop
                        logger.exception("stream relay failed")
                    group.cancel_scope.cancel()

                group.start_soon(stream)
                await self.listen_for_disconnect(receive)
                group.cancel_scope.cancel()
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                with anyio.CancelScope(shield=True):
                    await aclose()


def _strip_thinking(request: Request) -> bool:
    return request.headers.get(STRIP_THINKING_HEADER, "").strip().lower() in {"1", "true", "yes", "on"}


def _respond(reply: JsonReply | StreamReply) -> Response:
    headers = {COMPLETION_ID_HEADER: reply.completion_id} if reply.completion_id else {}
    if isinstance(reply, StreamReply):
        return SseResponse(reply.chunks, headers={**headers, "Cache-Control": "no-cache"})
    return JSONResponse(reply.body, headers=headers)


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it when the client disconnects first: cancelling the upstream call closes its
    connection, which makes the inference server abort the generation (a non-streamed answer nobody waits for
    would otherwise keep the server busy, and everyone queued behind it waiting)."""
    task = asyncio.ensure_future(work)

    async def listen() -> None:
        while True:
            message = await request.receive()  # the body is read already: the next message is the disconnect
            if message["type"] == "http.disconnect":
                logger.debug("client disconnected before the answer: cancelling the upstream request")
                task.cancel()
                return

    listener = asyncio.ensure_future(listen())
    try:
        return await task
    finally:
        listener.cancel()


#: A generation answers JSON, or with `stream: true` server-sent events: both are documented.
_SSE_EVENT = {"type": "object", "required": ["data"], "properties": {"data": {"type": "string"}}}
_GENERATION_RESPONSES: dict[int | str, dict] = {
    200: {"description": "The completion, or its chunks as server-sent events",
          "content": {"application/json": {}, "text/event-stream": {"schema": _SSE_EVENT}}},
}


@router.post("/v1/chat/completions", response_model=None, responses=_GENERATION_RESPONSES)
async def chat_completions(body: ChatCompletionRequest, request: Request, proxy: ProxyDep, auth: AuthDep) -> Response:
    return _respond(await _unless_disconnected(
        request, proxy.chat(body, auth, strip_thinking=_strip_thinking(request))))


@router.post("/v1/completions", response_model=None, responses=_GENERATION_RESPONSES)
async def completions(body: CompletionRequest, request: Request, proxy: ProxyDep, auth: AuthDep) -> Response:
    return _respond(await _unless_disconnected(
        request, proxy.completions(body, auth, strip_thinking=_strip_thinking(request))))


@router.get("/v1/models")
async def list_models(proxy: ProxyDep, auth: AuthDep) -> JSONResponse:
    return JSONResponse(await proxy.models(auth))


@router.post("/v1/score")
async def score(body: ScoreRequest, proxy: ProxyDep, auth: AuthDep) -> JSONResponse:
    return JSONResponse(await proxy.score(body, auth))
