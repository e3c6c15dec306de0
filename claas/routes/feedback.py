"""`POST /v1/feedback` (in-place update) and `POST /v1/distill` (new versioned checkpoint)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request

from claas.auth import AuthScope
from claas.core.types import DistillRequest, FeedbackRequest, OrchestrationConfig
from claas.deps import AuthDep, CacheDep, EngineDep, InferenceDep, MetricsDep, SettingsDep
from claas.errors import ForbiddenError
from claas.feedback import FeedbackServices, LoraLocks, run_feedback
from claas.inference.sleep import SleepCoordinator

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
    if getattr(state, "lora_locks", None) is None:
        state.lora_locks = LoraLocks()
    if getattr(state, "sleep", None) is None:
        state.sleep = SleepCoordinator()
    return FeedbackServices(settings, engine, inference, cache, metrics, state.lora_locks, state.sleep)


ServicesDep = Annotated[FeedbackServices, Depends(feedback_services)]


@router.post("/v1/feedback")
async def feedback(body: FeedbackRequest, services: ServicesDep, auth: AuthDep) -> dict[str, Any]:
    items = body.items()
    auth.require(items[0].lora_id)
    _require_admin_for_orchestration(body.orchestration, auth)
    return await run_feedback(services, items, body.orchestration, scope=auth)


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


@router.post("/v1/distill")
async def distill(body: DistillRequest, services: ServicesDep, auth: AuthDep) -> dict[str, Any]:
    auth.require(body.lora_id)
    return await run_feedback(services, [body], OrchestrationConfig(), save_mode="version", scope=auth)
