"""FastAPI dependencies, declared once as `Annotated` aliases; tests swap them with `app.dependency_overrides`.

Everything is created by the app's lifespan (claas.api) and kept on `app.state`; these functions only hand it out.
They are `async def` on purpose: FastAPI runs plain `def` dependencies in a thread pool, which costs a thread hop
on every request.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Request

from claas.auth import AuthScope
from claas.core.config import Settings
from claas.errors import UnauthorizedError
from claas.inference.cache import CompletionCache
from claas.inference.proxy import InferenceProxy
from claas.inference.sleep import SleepCoordinator
from claas.inference.vllm import VllmClient
from claas.observability import Metrics
from claas.training.engine.base import TrainingEngine


def _state(request: Request, name: str) -> Any:
    try:
        return getattr(request.app.state, name)
    except AttributeError:
        raise RuntimeError(f"app.state.{name} is not set: run the app with its lifespan (build_app)") from None


async def get_app_settings(request: Request) -> Settings:
    return _state(request, "settings")


async def get_inference(request: Request) -> VllmClient:
    return _state(request, "inference")


async def get_cache(request: Request) -> CompletionCache:
    return _state(request, "cache")


async def get_engine(request: Request) -> TrainingEngine:
    return _state(request, "engine")


async def get_metrics(request: Request) -> Metrics:
    return _state(request, "metrics")


async def get_auth(request: Request) -> AuthScope:
    """The caller's scope from `Authorization: Bearer <key>`; 401 when keys are configured and it is missing/wrong."""
    return _state(request, "api_keys").authenticate(request.headers.get("authorization"))


async def get_optional_auth(request: Request) -> AuthScope | None:
    """The caller's scope, or None when keys are configured and the request has no valid one (routes that answer
    anonymous callers too, with less)."""
    try:
        return await get_auth(request)
    except UnauthorizedError:
        return None


SettingsDep = Annotated[Settings, Depends(get_app_settings)]
InferenceDep = Annotated[VllmClient, Depends(get_inference)]
CacheDep = Annotated[CompletionCache, Depends(get_cache)]
EngineDep = Annotated[TrainingEngine, Depends(get_engine)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
AuthDep = Annotated[AuthScope, Depends(get_auth)]
OptionalAuthDep = Annotated[AuthScope | None, Depends(get_optional_auth)]


async def get_sleep(request: Request) -> SleepCoordinator:
    return _state(request, "sleep")


SleepDep = Annotated[SleepCoordinator, Depends(get_sleep)]


async def get_proxy(
    inference: InferenceDep,
    cache: CacheDep,
    engine: EngineDep,
    metrics: MetricsDep,
    sleep: SleepDep,
    settings: SettingsDep,
) -> InferenceProxy:
    return InferenceProxy(inference, cache, engine, metrics, sleep=sleep, sleep_wait_s=settings.sleep_wait_timeout_s,
                          context_overflow=settings.context_overflow)


ProxyDep = Annotated[InferenceProxy, Depends(get_proxy)]
