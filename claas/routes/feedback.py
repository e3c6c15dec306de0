"""`POST /v1/feedback` (in-place update) and `POST /v1/distill` (new versioned checkpoint)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request

from claas.core.types import DistillRequest, FeedbackRequest, OrchestrationConfig
from claas.deps import AuthDep, CacheDep, EngineDep, InferenceDep, MetricsDep, SettingsDep
from claas.feedback import FeedbackServices, LoraLocks, run_feedback

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
    return FeedbackServices(settings, engine, inference, cache, metrics, state.lora_locks)


ServicesDep = Annotated[FeedbackServices, Depends(feedback_services)]


@router.post("/v1/feedback")
async def feedback(body: FeedbackRequest, services: ServicesDep, auth: AuthDep) -> dict[str, Any]:
    items = body.items()
    auth.require(items[0].lora_id)
    return await run_feedback(services, items, body.orchestration, scope=auth)


@router.post("/v1/distill")
async def distill(body: DistillRequest, services: ServicesDep, auth: AuthDep) -> dict[str, Any]:
    auth.require(body.lora_id)
    return await run_feedback(services, [body], OrchestrationConfig(), save_mode="version", scope=auth)
