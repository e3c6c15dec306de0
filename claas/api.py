"""The CLaaS API: `build_app(settings) -> FastAPI`, served as `uvicorn claas.api:web_app` (or `claas api`).

The factory is cheap: it wires routes, middleware and error handlers. The lifespan owns the resources: the httpx
client to the inference server (`VllmClient`), the `CompletionCache` and the training engine (built from settings
unless one is passed in), kept on `app.state` and reached through the aliases in `claas.deps`; closed in `finally`.

Request bodies over `max_request_bytes` get 413 (declared Content-Length or counted while streaming in). With
`CLAAS_API_KEYS` set, routes that take `AuthDep` need a bearer key. `/metrics` is Prometheus text, unauthenticated
like vLLM's own.

Not here: route logic (claas.routes.*), services (claas.inference.proxy, claas.feedback).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncGenerator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import claas
from claas.auth import ApiKeys
from claas.core.config import Settings, get_settings, secret
from claas.dashboard import routes as dashboard_routes
from claas.deps import AuthDep
from claas.errors import ERROR_RESPONSES, ClaasError, PayloadTooLargeError, install_error_handlers
from claas.inference.base import InferenceBackend
from claas.inference.cache import CompletionCache
from claas.inference.sleep import SleepCoordinator
from claas.inference.vllm import VllmClient
from claas.logs import RequestIdMiddleware
from claas.observability import Metrics, MetricsMiddleware, metrics_endpoint
from claas.routes import feedback as feedback_routes
from claas.routes import health as health_routes
from claas.routes import inference as inference_routes
from claas.routes import lora as lora_routes
from claas.training.engine import get_training_engine
from claas.training.engine.base import TrainingEngine

logger = logging.getLogger(__name__)

#: Routers included when their module exists (the lead's feedback/lora/health routers land separately).


def build_app(settings: Settings | None = None, *, engine: TrainingEngine | None = None) -> FastAPI:
    """The API app. A passed-in `engine` stays owned by the caller (not closed by the lifespan)."""
    settings = settings if settings is not None else get_settings()
    metrics = Metrics.create()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncGenerator[None]:
        inference = VllmClient(
            settings.vllm_base_url,
            api_key=secret(settings.vllm_api_key),
            timeout_s=settings.vllm_timeout_s,
            inplace_reload=settings.vllm_inplace_reload,
        )
        training = engine
        waking: asyncio.Task[None] | None = None
        try:
            if training is None:
                training = get_training_engine(settings.training_engine, settings)
                await training.warmup()  # load the base model now, not on the first feedback
            app.state.inference = training.inference_backend() or inference
            app.state.cache = CompletionCache(
                settings.completion_cache_size,
                settings.completion_cache_ttl_s,
                max_bytes=settings.completion_cache_max_bytes,
                on_lookup=metrics.record_cache_lookup,
            )
            app.state.engine = training
            logger.info("CLaaS API ready: inference server %s, engine %s", settings.vllm_base_url, training.kind)
            # In the background, so an unreachable server does not hold up the start.
            waking = asyncio.create_task(_wake_if_asleep(app.state.inference))
            yield
        finally:
            if waking is not None:
                waking.cancel()
            try:
                if engine is None and training is not None:
                    await training.close()
            finally:
                await inference.aclose()

    api_keys = ApiKeys.parse(secret(settings.api_keys))
    # With keys configured the schema and its docs page need a key too (they list every route and field).
    keyed = api_keys.enabled
    app = FastAPI(
        title="CLaaS",
        version=claas.__version__,
        lifespan=lifespan,
        docs_url=None if keyed else "/docs",
        redoc_url=None if keyed else "/redoc",
        openapi_url=None if keyed else "/openapi.json",
        responses=ERROR_RESPONSES,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.api_keys = api_keys
    app.state.sleep = SleepCoordinator()  # one per inference server: shared by feedback steps and the proxy
    if keyed:
        _add_keyed_docs(app)

    install_error_handlers(app)
    for router in (inference_routes.router, feedback_routes.router, lora_routes.router, health_routes.router):
        app.include_router(router)
    app.include_router(dashboard_routes.router)
    app.add_route("/metrics", metrics_endpoint, methods=["GET"], include_in_schema=False)

    # add_middleware puts each new middleware outside the previous: metrics see the 413s too.
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_request_bytes)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.add_middleware(RequestIdMiddleware)  # outermost: every line logged for a request carries its id
    return app


async def _wake_if_asleep(inference: InferenceBackend) -> None:
    """A server found asleep at start was left so by an API that stopped mid-step (or a `wake_after: false`):
    nothing of ours is training yet, so wake it, or every chat would wait and then fail."""
    try:
        if await inference.health() and await inference.is_sleeping():
            logger.warning("the inference server was asleep at start: waking it")
            await inference.wake_up()
    except ClaasError as exc:
        logger.warning("could not check whether the inference server sleeps: %s", exc.message)


def _add_keyed_docs(app: FastAPI) -> None:
    """`/openapi.json` and `/docs` behind the bearer key (FastAPI's own ones are switched off)."""

    async def openapi(auth: AuthDep) -> JSONResponse:
        return JSONResponse(app.openapi())

    async def docs(auth: AuthDep) -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{app.title} - docs")

    app.add_api_route("/openapi.json", openapi, methods=["GET"], include_in_schema=False)
    app.add_api_route("/docs", docs, methods=["GET"], include_in_schema=False)


class BodySizeLimitMiddleware:
    """413 for bodies over `max_bytes`: at once from Content-Length, else while the body is read (chunked uploads).

    Pure ASGI. When the streamed body overflows, the app's own answer (FastAPI turns the read error into a 400) is
    dropped and the 413 sent instead.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await self._reject(send)
            return
        received = 0
        overflow = False
        started = False

        async def limited_receive() -> Message:
            nonlocal received, overflow
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    overflow = True
                    raise self._error()
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if overflow and not started:
                return
            started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not overflow:
                raise
        if overflow and not started:
            await self._reject(send)

    def _error(self) -> PayloadTooLargeError:
        return PayloadTooLargeError(
            f"request body exceeds the limit of {self.max_bytes} bytes (CLAAS_MAX_REQUEST_BYTES)"
        )

    async def _reject(self, send: Send) -> None:
        error = self._error()
        body = json.dumps(error.to_body()).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": error.status_code, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def __getattr__(name: str) -> Any:
    """`claas.api:web_app` is built on first access (uvicorn's import), not at import time."""
    if name == "web_app":
        app = build_app()
        globals()["web_app"] = app
        return app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
