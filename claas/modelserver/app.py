"""FastAPI app of the model server: `build_app(engine)`, thin routes, error handlers, optional bearer auth.

Routes parse the request, call one engine or serving function, and pick `JSONResponse`, plain text or
`StreamingResponse`. Errors leave through one handler per error family, always in vLLM's newer shape
`{"error": {"message", "type", "param", "code"}}` with HTTP status = code; FastAPI's 422 for invalid bodies is
replaced by vLLM's 400. With `api_key` set, `/v1/*` needs `Authorization: Bearer <key>` (401 `{"error":
"Unauthorized"}` otherwise, vLLM's body); `/health`, `/metrics`, `/tokenize`, `/detokenize`, `/sleep`, `/wake_up`
and `/is_sleeping` stay open as in vLLM, so never expose this server beyond a private network.

Not here: generation (engine.py), response shapes (serving.py, responses.py).
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager
from http import HTTPStatus
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from claas.modelserver import prompts, serving
from claas.modelserver.engine import Engine
from claas.modelserver.errors import ModelServerError, error_body
from claas.modelserver.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    LoadLoRAAdapterRequest,
    TokenizeRequest,
    UnloadLoRAAdapterRequest,
)
from claas.modelserver.responses import new_id, now

logger = logging.getLogger(__name__)


def get_engine(request: Request) -> Engine:
    return request.app.state.engine


EngineDep = Annotated[Engine, Depends(get_engine)]


class BearerAuth:
    """vLLM's `--api-key`: every path under /v1 needs the bearer token; everything else stays open."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] != "OPTIONS" and scope["path"].startswith("/v1"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not secrets.compare_digest(given, self.expected):
                await JSONResponse({"error": "Unauthorized"}, status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _loc_to_param(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if p != "body" and not str(p).startswith(("function-", "list[", "str", "int"))]
    return ".".join(parts) or ".".join(str(p) for p in loc)


async def _validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    if errors and errors[0].get("type") == "json_invalid":
        ctx = errors[0].get("ctx") or {}
        message = f"The request body is not valid JSON: {ctx.get('error', 'JSON decode error')}"
        return JSONResponse(error_body(message, HTTPStatus.BAD_REQUEST.phrase, 400), status_code=400)
    param = _loc_to_param(tuple(errors[0].get("loc", ()))) if errors else None
    lines = []
    for err in errors[:10]:
        where = _loc_to_param(tuple(err.get("loc", ())))
        lines.append(f"  {where}: {err.get('msg', 'invalid value')} (type={err.get('type')})")
    label = "error" if len(errors) == 1 else "errors"
    message = f"{len(errors)} validation {label}:\n" + "\n".join(lines) if errors else "Validation error"
    return JSONResponse(error_body(message, HTTPStatus.BAD_REQUEST.phrase, 400, param), status_code=400)


async def _server_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ModelServerError)
    return JSONResponse(exc.body(), status_code=int(exc.status))


async def _http_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    status = HTTPStatus(exc.status_code)
    return JSONResponse(error_body(str(exc.detail), status.phrase, status), status_code=exc.status_code)


async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error", exc_info=exc)
    body = error_body(f"{type(exc).__name__}: {exc}", "InternalServerError", HTTPStatus.INTERNAL_SERVER_ERROR)
    return JSONResponse(body, status_code=500)


def _respond(result: dict[str, Any] | AsyncIterator[str]) -> Response:
    if isinstance(result, dict):
        return JSONResponse(result)
    return StreamingResponse(result, media_type="text/event-stream")


def build_app(engine: Engine, *, api_key: str | None = None) -> FastAPI:
    """The vLLM-compatible HTTP app around one engine; the lifespan starts and stops the engine's worker."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncGenerator[None]:
        engine.start()
        try:
            yield
        finally:
            engine.shutdown()

    app = FastAPI(title="CLaaS model server (vLLM-compatible)", lifespan=lifespan)
    app.state.engine = engine
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(ModelServerError, _server_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
    if api_key:
        app.add_middleware(BearerAuth, api_key=api_key)

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200)

    @app.get("/v1/models")
    async def list_models(engine: EngineDep) -> dict[str, Any]:
        def card(model_id: str, root: str, parent: str | None) -> dict[str, Any]:
            permission = {
                "id": new_id("modelperm"),
                "object": "model_permission",
                "created": now(),
                "allow_create_engine": False,
                "allow_sampling": True,
                "allow_logprobs": True,
                "allow_search_indices": False,
                "allow_view": True,
                "allow_fine_tuning": False,
                "organization": "*",
                "group": None,
                "is_blocking": False,
            }
            return {
                "id": model_id,
                "object": "model",
                "created": now(),
                "owned_by": "vllm",
                "root": root,
                "parent": parent,
                "max_model_len": engine.max_model_len,
                "permission": [permission],
            }

        base = engine.served_model_name
        cards = [card(base, engine.model_arg, None)]
        cards += [card(name, path, base) for name, path in engine.adapters.items()]
        return {"object": "list", "data": cards}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request, engine: EngineDep) -> Response:
        return _respond(await serving.chat_completion(engine, body, request.is_disconnected))

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request, engine: EngineDep) -> Response:
        return _respond(await serving.completion(engine, body, request.is_disconnected))

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest, engine: EngineDep) -> dict[str, Any]:
        prompts.resolve_adapter(engine, body.model)
        if body.prompt is not None:
            add_special = True if body.add_special_tokens is None else body.add_special_tokens
            ids = prompts.encode(engine, body.prompt, add_special_tokens=add_special)
        else:
            text = prompts.render_chat(
                engine,
                body.messages or [],
                add_generation_prompt=body.add_generation_prompt,
                continue_final_message=body.continue_final_message,
                tools=body.tools,
                chat_template=body.chat_template,
                chat_template_kwargs=body.chat_template_kwargs,
            )
            ids = prompts.encode(engine, text, add_special_tokens=bool(body.add_special_tokens))
        strs = engine.tokenizer.convert_ids_to_tokens(ids) if body.return_token_strs else None
        return {"count": len(ids), "max_model_len": engine.max_model_len, "tokens": ids, "token_strs": strs}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest, engine: EngineDep) -> dict[str, Any]:
        prompts.resolve_adapter(engine, body.model)
        if body.tokens:
            prompts.check_token_ids(engine, body.tokens, param="tokens")
        return {"prompt": engine.tokenizer.decode(body.tokens)}

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(body: LoadLoRAAdapterRequest, engine: EngineDep) -> Response:
        await engine.load_adapter(body.lora_name, body.lora_path, load_inplace=body.load_inplace)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(body: UnloadLoRAAdapterRequest, engine: EngineDep) -> Response:
        await engine.unload_adapter(body.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    @app.post("/sleep")
    async def sleep(engine: EngineDep, level: int = 1) -> Response:
        await engine.sleep(level)
        return Response(status_code=200)

    @app.post("/wake_up")
    async def wake_up(engine: EngineDep, tags: Annotated[list[str] | None, Query()] = None) -> Response:
        await engine.wake_up(tags)
        return Response(status_code=200)

    @app.get("/is_sleeping")
    async def is_sleeping(engine: EngineDep) -> dict[str, bool]:
        return {"is_sleeping": engine.is_sleeping}

    @app.get("/metrics")
    async def metrics(engine: EngineDep) -> Response:
        return Response(engine.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app
