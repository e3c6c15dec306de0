"""`GET /v1/health`: the API, the training engine and the inference server; 200 when all are usable, else 503."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from claas.deps import EngineDep, InferenceDep

router = APIRouter(tags=["health"])


@router.get("/v1/health")
async def health(engine: EngineDep, inference: InferenceDep) -> JSONResponse:
    server_ok = await inference.health()
    sleeping = await inference.is_sleeping() if server_ok else None
    engine_state = await engine.health()
    healthy = server_ok
    body = {
        "status": "ok" if healthy else "degraded",
        "api": "ok",
        "engine": engine_state,
        "inference": {"url": inference.base_url, "reachable": server_ok, "sleeping": sleeping},
    }
    return JSONResponse(body, status_code=200 if healthy else 503)
