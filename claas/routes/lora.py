"""LoRA lifecycle: `POST /v1/lora/init`, `GET /v1/lora`, `GET /v1/lora/export`, `DELETE /v1/lora`."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, Query, Request, Response

from claas.core.lora_ids import LATEST, split_version, validate_lora_id
from claas.core.types import LoraInfo, LoraInitRequest
from claas.deps import AuthDep, EngineDep, InferenceDep, SettingsDep
from claas.errors import UnprocessableError
from claas.inference.proxy import served_base_models
from claas.inference.vllm import VllmClient
from claas.lora_locks import lora_locks

logger = logging.getLogger(__name__)

router = APIRouter(tags=["lora"])


@router.post("/v1/lora/init")
async def init_lora(
    body: LoraInitRequest, engine: EngineDep, inference: InferenceDep, auth: AuthDep, request: Request,
    settings: SettingsDep,
) -> LoraInfo:
    validate_lora_id(body.lora_id)
    auth.require(body.lora_id)
    if body.lora_id in await served_base_models(inference):  # the server would refuse it; refuse before writing
        raise UnprocessableError(
            f"lora_id {body.lora_id!r} is the name of a base model on the inference server; choose another id",
            param="lora_id",
        )
    # Under the adapter's lock, like every write of it (a feedback or delete of the same id waits).
    async with lora_locks(request.app.state).hold(body.lora_id, settings.feedback_lock_timeout_s, engine):
        info = await engine.init_lora(body)
        # Servable at once: load it on the inference server under its lora_id. All or nothing: an adapter the
        # server did not take is removed again, so the caller's retry is not refused with "already exists".
        try:
            ref = await engine.lora_runtime_ref(body.lora_id)
            await inference.reload_lora_adapter(ref.name, ref.path)
        except Exception:
            try:
                await engine.delete_lora(body.lora_id)
            except Exception:
                logger.exception("could not undo the creation of %s after the server refused it", body.lora_id)
            raise
    return info


@router.get("/v1/lora")
async def list_loras(engine: EngineDep, auth: AuthDep, prefix: str = "") -> dict[str, Any]:
    loras = await engine.list_loras(prefix)
    visible = [lora for lora in loras if auth.allows(lora.lora_id)]
    return {"loras": [lora.model_dump() for lora in visible]}


@router.get("/v1/lora/export", response_class=Response,
            responses={200: {"description": "The adapter's files as a zip", "content": {"application/zip": {}}}})
async def export_lora(engine: EngineDep, auth: AuthDep, lora_id: str = Query(min_length=1)) -> Response:
    validate_lora_id(lora_id, allow_version=True)
    auth.require(lora_id)
    data = await engine.export_lora(lora_id)
    filename = lora_id.replace("/", "__").replace("@", "_") + ".zip"
    return Response(data, media_type="application/zip",
                    headers={"Content-Disposition": f'attachment; filename="{filename}"'})


@router.delete("/v1/lora")
async def delete_lora(
    engine: EngineDep,
    inference: InferenceDep,
    auth: AuthDep,
    request: Request,
    settings: SettingsDep,
    lora_id: str = Query(min_length=1),
) -> dict[str, Any]:
    validate_lora_id(lora_id, allow_version=True)
    auth.require(lora_id)
    async with lora_locks(request.app.state).hold(lora_id, settings.feedback_lock_timeout_s, engine):
        await engine.delete_lora(lora_id)
    unloaded = await _unload_served_versions(inference, lora_id)
    return {"deleted": lora_id, "unloaded": unloaded}


async def _unload_served_versions(inference: VllmClient, lora_id: str) -> list[str]:
    """Unload from the inference server every loaded name the deletion made stale: for an adapter, itself and all
    its versions (`x@latest`, `x@<timestamp>`); for one version, it and `x@latest` (which may have pointed at it;
    the proxy reloads the alias on its next use). Otherwise they would stay servable to any key."""
    base, version = split_version(lora_id)
    loaded = {str(card.get("id")) for card in await inference.models() if card.get("parent") is not None}
    if version is None:
        stale = {name for name in loaded if split_version(name)[0] == base}
    else:
        stale = loaded & {lora_id, f"{base}@{LATEST}"}
    for name in sorted(stale | {lora_id}):
        await inference.unload_lora_adapter(name, missing_ok=True)
    return sorted(stale)
