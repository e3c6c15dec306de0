"""`POST /v1/feedback` (in-place update) and `POST /v1/distill` (new versioned checkpoint).

Both take an optional `Idempotency-Key` header: a retry with the same key returns the first outcome (claas.idempotency).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from claas.auth import AuthScope
from claas.core.types import DistillRequest, FeedbackRequest, OrchestrationConfig
from claas.deps import AuthDep, CacheDep, EngineDep, InferenceDep, MetricsDep, SettingsDep
from claas.errors import ForbiddenError
from claas.feedback import FeedbackServices, reload_served_adapter, run_feedback
from claas.idempotency import HEADER as IDEMPOTENCY_HEADER
from claas.idempotency import IdempotencyStore
from claas.inference.sleep import SleepCoordinator
from claas.lora_locks import lora_locks

router = APIRouter(tags=["feedback"])


def feedback_services(
    request: Request,
    settings: SettingsDep,
    engine: EngineDep,
    inference: InferenceDep,
    cache: CacheDep,
    metrics: MetricsDep,
) -> FeedbackServices:
    state = request.app.state
    if getattr(state, "sleep", None) is None:
        state.sleep = SleepCoordinator()
    return FeedbackServices(settings, engine, inference, cache, metrics, lora_locks(state), state.sleep)


ServicesDep = Annotated[FeedbackServices, Depends(feedback_services)]


@router.post("/v1/feedback", response_model=None)
async def feedback(
    body: FeedbackRequest, services: ServicesDep, auth: AuthDep, request: Request
) -> dict[str, Any] | JSONResponse:
    items = body.items()
    auth.require(items[0].lora_id)
    _require_admin_for_orchestration(body.orchestration, auth)
    return await _once(request, services, auth, body, lambda: run_feedback(services, items, body.orchestration,
                                                                         scope=auth))


async def _once(
    request: Request,
    services: FeedbackServices,
    auth: AuthScope,
    body: FeedbackRequest | DistillRequest,
    run: Callable[[], Awaitable[dict[str, Any]]],
) -> dict[str, Any] | JSONResponse:
    """Run the transaction, or with an Idempotency-Key, return the first outcome of that key."""
    key = request.headers.get(IDEMPOTENCY_HEADER)
    if key is None:
        return await run()
    state = request.app.state
    if getattr(state, "idempotency", None) is None:
        state.idempotency = IdempotencyStore(services.settings.feedback_log_dir / ".idempotency")
    fingerprint = f"{request.url.path}\0{body.model_dump_json()}"
    status, payload, headers = await state.idempotency.run(
        key, auth.prefix, fingerprint, run, lambda lora_id: reload_served_adapter(services, lora_id)
    )
    return JSONResponse(payload, status_code=status, headers=headers)


def _require_admin_for_orchestration(orchestration: OrchestrationConfig, auth: AuthScope) -> None:
    """Orchestration overrides act on the shared inference server (leave it asleep, deeper sleep, train without
    sleeping next to it), so they affect every tenant: only an admin key may change them."""
    if auth.is_admin:
        return
    defaults = OrchestrationConfig()
    for name in OrchestrationConfig.model_fields:
        if getattr(orchestration, name) != getattr(defaults, name):
            raise ForbiddenError(
                f"orchestration.{name} affects every tenant of the inference server; only an admin key may set it",
                param=f"orchestration.{name}",
            )


@router.post("/v1/distill", response_model=None)
async def distill(
    body: DistillRequest, services: ServicesDep, auth: AuthDep, request: Request
) -> dict[str, Any] | JSONResponse:
    auth.require(body.lora_id)
    return await _once(request, services, auth, body, lambda: run_feedback(
        services, [body], OrchestrationConfig(), save_mode="version", scope=auth))
