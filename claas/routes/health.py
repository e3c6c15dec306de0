"""`GET /v1/health`: the API, the training engine and the inference server; 200 when all are usable, else 503.

A sleeping inference server is "degraded" (503): it answers no chat until woken. With API keys configured, only an
admin key gets the details (upstream URL, adapter root, engine state); anyone else gets `{"status": ...}` with the
same status code, so load-balancer probes keep working without a key and learn nothing about the deployment.
"""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from claas.deps import EngineDep, InferenceDep, OptionalAuthDep

router = APIRouter(tags=["health"])


@router.get("/v1/health")
async def health(engine: EngineDep, inference: InferenceDep, auth: OptionalAuthDep) -> JSONResponse:
    server_ok = await inference.health()
    sleeping = await inference.is_sleeping() if server_ok else None
    healthy = server_ok and not sleeping
    status = "ok" if healthy else "degraded"
    code = 200 if healthy else 503
    if auth is None or not auth.is_admin:
        return JSONResponse({"status": status}, status_code=code)
    body = {
        "status": status,
        "api": "ok",
        "engine": await engine.health(),
        "inference": {"url": inference.base_url, "reachable": server_ok, "sleeping": sleeping},
    }
    return JSONResponse(body, status_code=code)
