"""TinkerEngine: SDPO steps on Tinker's hosted trainer; adapters are Tinker checkpoints named in a state file.

init: a LoRA training client for the base model, `save_state` + `save_weights_for_sampler`. distill: restore the
adapter with its optimizer state (`create_training_client_from_state_with_optimizer`, kept hot while the state file
still names the checkpoint it holds), score the teacher (the base model prompted with the hindsight block) through
the sampler's `topk_prompt_logprobs`, run the top-K + tail JSD with `forward_backward_custom` (maths in
`tinker_loss`), `optim_step(AdamParams)`, then `save_state` + `save_weights_for_sampler`; the feedback transaction's
adapter reload then points the proxy's sampler at the new weights. The state file is updated only after both saves,
so a failed step leaves the previous checkpoint current.

Export: `save_weights_external` + `get_external_weights_urls`, files downloaded and zipped (PEFT layout, as Tinker
writes it). Delete: the state entries, then every checkpoint they saved.
Not here: sampling for chat (claas.inference.tinker), the loss maths (tinker_loss), tokens and Datums (tinker_data).
"""

from __future__ import annotations

import asyncio
import io
import logging
import time
import uuid
import zipfile
from collections import OrderedDict
from dataclasses import replace
from datetime import datetime, timezone
from typing import Any

import httpx

from claas.core.config import Settings
from claas.core.types import DistillBatch, DistillResult, LoraInfo, LoraInitRequest, LoraRuntimeRef
from claas.errors import InvalidRequestError
from claas.inference.tinker import TinkerInference, TinkerSamplers
from claas.training.engine.base import TrainingEngine
from claas.training.engine.remote_errors import EngineConfigError, RemoteEngineError, tinker_errors
from claas.training.engine.tinker_state import TinkerLora, TinkerState, utc_now_iso
from claas.training.engine.tinker_step import run_sdpo_step
from claas.training.storage import LoraExistsError, LoraNotFoundError, split_version, validate_lora_id

logger = logging.getLogger(__name__)

HOT_CLIENTS = 8


def secret_value(value: Any) -> str | None:
    """A setting that may be a plain string or a pydantic SecretStr."""
    if value is None:
        return None
    getter = getattr(value, "get_secret_value", None)
    return getter() if callable(getter) else str(value)


def checkpoint_name(lora_id: str, step: int) -> str:
    """Tinker checkpoint names: letters, digits, '-', '_' (the id's '/', '.', '@' become '_')."""
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in lora_id)
    return f"{safe}-s{step:06d}-{uuid.uuid4().hex[:6]}"


class TinkerEngine(TrainingEngine):
    kind = "tinker"
    # Training runs on Tinker's machines; there is no local inference server to put to sleep.
    shares_inference_device = False

    def __init__(
        self,
        settings: Settings,
        *,
        service: Any | None = None,
        rest: Any | None = None,
        http: httpx.AsyncClient | None = None,
    ) -> None:
        """Real clients from the settings, or `service` + `rest` handed in (tests: fakes of the SDK's clients)."""
        self._key = secret_value(settings.tinker_api_key)
        self._base_url = settings.tinker_base_url
        if service is None or rest is None:
            if not self._key:
                raise EngineConfigError(
                    "CLAAS_TRAINING_ENGINE=tinker needs CLAAS_TINKER_API_KEY (a Tinker key, tml-...); set it, or "
                    "choose CLAAS_TRAINING_ENGINE=local"
                )
            import tinker

            service = service or tinker.ServiceClient(api_key=self._key, base_url=self._base_url)
        self.service: Any = service
        self._rest: Any = rest  # tinker.RestClient starts a process-wide connection holder: made on first use
        self.base_model = settings.tinker_base_model
        self.default_rank = settings.lora_rank
        # `store` is what the feedback transaction locks per adapter (across replicas sharing the state file).
        self.store = TinkerState(settings.lora_root)
        self.samplers = TinkerSamplers(service, self.base_model)
        self._http = http or httpx.AsyncClient(timeout=300.0, follow_redirects=True)
        self._hot: OrderedDict[str, tuple[str, Any]] = OrderedDict()  # lora_id -> (state_path it equals, client)

    @property
    def rest(self) -> Any:
        if self._rest is None:
            import tinker

            self._rest = tinker.RestClient(api_key=self._key, base_url=self._base_url)
        return self._rest

    def inference_backend(self) -> TinkerInference:
        return TinkerInference(self.samplers)

    async def warmup(self) -> None:
        """Create the base model's sampler and load its tokenizer (fails early on a bad key or model name)."""
        await self.samplers.tokenizer()

    # ------------------------------------------------------------------ lifecycle
    async def init_lora(self, request: LoraInitRequest) -> LoraInfo:
        validate_lora_id(request.lora_id)
        if request.base_model not in (None, self.base_model):
            raise InvalidRequestError(
                f"this engine trains {self.base_model!r} (CLAAS_TINKER_BASE_MODEL), not {request.base_model!r}",
                param="base_model",
            )
        for name in ("lora_alpha", "target_modules"):
            if getattr(request, name) is not None:
                raise InvalidRequestError(f"`{name}` cannot be chosen on Tinker (it trains all layers)", param=name)
        if await asyncio.to_thread(self.store.exists, request.lora_id):
            raise LoraExistsError(f"adapter {request.lora_id!r} already exists")
        rank = request.lora_r or self.default_rank
        with tinker_errors("creating the LoRA training client"):
            client = await self.service.create_lora_training_client(base_model=self.base_model, rank=rank)
        state_path, sampler_path = await self._save(client, checkpoint_name(request.lora_id, 0))
        entry = TinkerLora(lora_id=request.lora_id, base_model=self.base_model, rank=rank, step=0,
                           state_path=state_path, sampler_path=sampler_path, checkpoints=[state_path, sampler_path])

        def add(entries: dict[str, TinkerLora]) -> None:
            if request.lora_id in entries:
                raise LoraExistsError(f"adapter {request.lora_id!r} already exists")
            entries[request.lora_id] = entry

        await asyncio.to_thread(self.store.update, add)
        self._remember(request.lora_id, state_path, client)
        return _info(entry)

    async def list_loras(self, prefix: str = "") -> list[LoraInfo]:
        entries = await asyncio.to_thread(self.store.list, prefix)
        return [_info(entry) for entry in entries]

    async def lora_exists(self, lora_id: str) -> bool:
        return await asyncio.to_thread(self.store.exists, lora_id)

    async def lora_runtime_ref(self, lora_id: str) -> LoraRuntimeRef:
        entry = await asyncio.to_thread(self._entry, lora_id)
        return LoraRuntimeRef(name=lora_id, path=entry.sampler_path)

    async def delete_lora(self, lora_id: str) -> None:
        validate_lora_id(lora_id, allow_version=True)
        base, version = split_version(lora_id)
        if version == "latest":
            raise InvalidRequestError(f"{lora_id!r} is an alias; delete the version itself", param="lora_id")

        def remove(entries: dict[str, TinkerLora]) -> list[TinkerLora]:
            doomed = [e for k, e in entries.items() if k == lora_id or (version is None and e.version_of == base)]
            if not doomed:
                raise LoraNotFoundError(f"no adapter {lora_id!r}")
            for entry in doomed:
                del entries[entry.lora_id]
            return doomed

        doomed = await asyncio.to_thread(lambda: self.store.update(remove))
        for entry in doomed:
            self._hot.pop(entry.lora_id, None)
            for path in entry.checkpoints:
                try:
                    with tinker_errors("deleting a checkpoint"):
                        await self.rest.delete_checkpoint_from_tinker_path(path)
                except RemoteEngineError as exc:  # the adapter is gone from CLaaS; a leftover costs storage only
                    logger.warning("could not delete Tinker checkpoint %s of %s: %s", path, entry.lora_id, exc)

    async def export_lora(self, lora_id: str) -> bytes:
        entry = await asyncio.to_thread(self._entry, lora_id)
        client = await self._training_client(entry)
        with tinker_errors("exporting the adapter"):
            saved = await client.save_weights_external(checkpoint_name(lora_id, entry.step) + "-export")
            urls = (await self.rest.get_external_weights_urls(saved.path)).urls
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            for name, url in sorted(urls.items()):
                response = await self._http.get(url)
                if response.status_code != 200:
                    raise RemoteEngineError(f"tinker export: downloading {name} gave HTTP {response.status_code}")
                archive.writestr(name.lstrip("/"), response.content)
        if "adapter_config.json" not in urls:
            raise RemoteEngineError(f"tinker export of {lora_id!r} has no adapter_config.json (files: {sorted(urls)})")
        try:
            with tinker_errors("deleting the export checkpoint"):
                await self.rest.delete_checkpoint_from_tinker_path(saved.path)
        except RemoteEngineError as exc:
            logger.warning("could not delete export checkpoint %s: %s", saved.path, exc)
        return buffer.getvalue()

    # ------------------------------------------------------------------ training
    async def distill(self, batch: DistillBatch) -> DistillResult:
        cfg = batch.training
        if cfg.teacher_mode != "self":
            raise ValueError("teacher_mode=remote is not available on the tinker engine (the teacher is the base)")
        timing: dict[str, float] = {}
        started = time.perf_counter()
        entry = await asyncio.to_thread(self.store.get, batch.lora_id)
        client = await self._training_client(entry)
        timing["load_adapter"] = _ms_since(started)
        try:
            metrics = await run_sdpo_step(client, self.samplers, batch.examples, cfg, timing)
            phase = time.perf_counter()
            step = entry.step + cfg.steps
            if batch.save_mode == "version":
                saved_id = await self._save_version(client, entry, step, metrics)
                self._hot.pop(entry.lora_id, None)  # the in-place adapter stays as saved; the client moved on
            else:
                saved_id = entry.lora_id
                await self._save_in_place(client, entry, step)
            timing["save"] = _ms_since(phase)
        except BaseException:
            self._hot.pop(entry.lora_id, None)  # remote weights may be half-stepped: restore from the state next time
            raise
        return DistillResult(lora_id=saved_id, step=step, metrics=metrics, timing_ms=timing)

    async def _save_in_place(self, client: Any, entry: TinkerLora, step: int) -> None:
        state_path, sampler_path = await self._save(client, checkpoint_name(entry.lora_id, step))

        def advance(entries: dict[str, TinkerLora]) -> None:
            current = entries.get(entry.lora_id)
            if current is None:
                raise LoraNotFoundError(f"adapter {entry.lora_id!r} was deleted during the step")
            entries[entry.lora_id] = replace(current, step=step, state_path=state_path, sampler_path=sampler_path,
                                             updated_at=utc_now_iso(),
                                             checkpoints=[*current.checkpoints, state_path, sampler_path])

        await asyncio.to_thread(self.store.update, advance)
        self._remember(entry.lora_id, state_path, client)

    async def _save_version(self, client: Any, entry: TinkerLora, step: int, metrics: dict[str, float]) -> str:
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
        version_id = f"{entry.lora_id}@{stamp}"
        state_path, sampler_path = await self._save(client, checkpoint_name(version_id, step))
        now = utc_now_iso()
        version = TinkerLora(lora_id=version_id, base_model=entry.base_model, rank=entry.rank, step=step,
                             state_path=state_path, sampler_path=sampler_path, created_at=now, updated_at=now,
                             version_of=entry.lora_id, checkpoints=[state_path, sampler_path])

        def add(entries: dict[str, TinkerLora]) -> None:
            entries[version_id] = version

        await asyncio.to_thread(self.store.update, add)
        return version_id

    async def _save(self, client: Any, name: str) -> tuple[str, str]:
        with tinker_errors("saving the adapter"):
            state = await client.save_state(name)
            sampler = await client.save_weights_for_sampler(name)
        return state.path, sampler.path

    async def _training_client(self, entry: TinkerLora) -> Any:
        """The hot client if it still equals the checkpoint the state file names (another replica may have stepped
        the adapter since), else one restored from that checkpoint with its optimizer state."""
        hot = self._hot.get(entry.lora_id)
        if hot is not None and hot[0] == entry.state_path:
            self._hot.move_to_end(entry.lora_id)
            return hot[1]
        with tinker_errors("restoring the adapter"):
            client = await self.service.create_training_client_from_state_with_optimizer(entry.state_path)
        self._remember(entry.lora_id, entry.state_path, client)
        return client

    def _remember(self, lora_id: str, state_path: str, client: Any) -> None:
        self._hot[lora_id] = (state_path, client)
        self._hot.move_to_end(lora_id)
        while len(self._hot) > HOT_CLIENTS:
            self._hot.popitem(last=False)

    def _entry(self, lora_id: str) -> TinkerLora:
        """The entry of an id; `x@latest` is the newest version of x."""
        base, version = split_version(validate_lora_id(lora_id, allow_version=True))
        if version != "latest":
            return self.store.get(lora_id)
        versions = [e for e in self.store.list(f"{base}@") if e.version_of == base]
        if not versions:
            raise LoraNotFoundError(f"no adapter {lora_id!r}")
        return max(versions, key=lambda e: e.lora_id)

    async def health(self) -> dict[str, Any]:
        entries = await asyncio.to_thread(self.store.all)
        return {"engine": self.kind, "base_model": self.base_model, "loras": len(entries),
                "hot_clients": len(self._hot), "state_file": str(self.store.path)}

    async def close(self) -> None:
        self._hot.clear()
        await self._http.aclose()


def _info(entry: TinkerLora) -> LoraInfo:
    return LoraInfo(lora_id=entry.lora_id, base_model=entry.base_model, rank=entry.rank, alpha=0, step=entry.step,
                    created_at=entry.created_at, updated_at=entry.updated_at, version_of=entry.version_of)


def _ms_since(started: float) -> float:
    return round((time.perf_counter() - started) * 1000.0, 3)
