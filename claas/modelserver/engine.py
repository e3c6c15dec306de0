"""The generation engine: one resident model, one worker thread, continuous batching, adapters and sleep/wake.

Every torch operation runs on ONE dedicated worker thread, fed by a FIFO queue, and the asyncio event loop never
blocks. The worker is a continuous-batching scheduler, as vLLM's: between two decode steps it admits queued requests
in arrival order (prefill, one request at a time) while the batch has room (`max_num_seqs` choices), and every step
advances ALL running choices by one token with ONE forward pass over a left-padded KV batch (kvbatch.py). Choices
join and leave between steps; a request whose client went away is flagged cancelled and leaves at the next step.
Rows may use different adapters: one adapter (or none) for the whole batch runs the plain forward; a mix runs PEFT's
mixed-batch forward (the base layers once, each row's own LoRA delta added). Sampling, per-request `torch.Generator`
seeding (choice i of a request with seed s uses seed s + i, as vLLM's parallel sampling does), stop handling,
detokenization and logprobs are per choice (decoding.py), so a choice's tokens are those it gets alone, up to the
float rounding of a batched matmul (fp32: the greedy outputs measured identical).

Control jobs (adapter load/unload, sleep, wake) are queued like requests and run once the running batch is empty, so
a request never sees an adapter change or the weights move mid-answer; requests queued behind one wait for it.
The worker pushes each generated token to the request's asyncio queue with `loop.call_soon_threadsafe`.

Sleep: level 1 keeps the weights (moved to host memory on CUDA), level 2 drops weights and adapters; waking from
level 2 reloads the base model from disk and re-attaches every adapter from its path. As in vLLM, `wake_up(tags)`
can wake `weights` and `kv_cache` separately; the engine reports sleeping (and refuses generation) until both are
awake. Adapters can be loaded and unloaded while asleep (the CLaaS feedback loop reloads an adapter before it wakes
the server); they are validated against the recorded module shapes even at level 2, so a broken one is refused at
load time, not on first use.

Adapter swap: `load_adapter(..., load_inplace=True)` on a resident adapter with the same structure copies the new
weights into its tensors (milliseconds) instead of rebuilding PEFT modules; the copy is a control job on the worker
thread, so it happens while no request is decoding and no forward pass sees a half-copied adapter.

Generation defaults: fields a request omits come from the model's generation_config (vLLM's
`--generation-config auto`), the registry's `generation_defaults`, then `override_generation_config`.

Not here: HTTP, request validation, response shapes (serving.py, app.py).
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import logging
import queue
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from claas.core.models import REGISTRY, LoadedModel, load_model
from claas.modelserver.adapters import AdapterLoadError, AdapterSlots, looks_like_adapter_dir
from claas.modelserver.decoding import ChoiceDecoder, GenerationInput, Job, PromptLogprobs, TokenDelta, prefill
from claas.modelserver.errors import BadRequest, InternalError, ModelServerError, NotFound, Unavailable
from claas.modelserver.kvbatch import PaddedKVBatch
from claas.modelserver.metrics import ServerMetrics
from claas.modelserver.sampling import GENERATION_CONFIG_FIELDS

__all__ = ["Engine", "GenerationHandle", "GenerationInput", "PromptLogprobs", "TokenDelta"]

logger = logging.getLogger(__name__)
T = TypeVar("T")
_DONE = object()
SLEEP_TAGS = frozenset({"weights", "kv_cache"})
DTYPES = ("auto", "float32", "bfloat16")


def resolve_dtype(preference: str, device: Any) -> Any:
    """vLLM's `--dtype`: `auto` is bf16 on CUDA and float32 on CPU; `bfloat16` / `float32` force one."""
    import torch

    if preference not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {preference!r}")
    if preference == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, preference)


def generation_defaults(
    loaded: LoadedModel, model_arg: str, mode: str = "auto", overrides: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Sampling defaults for omitted request fields, as vLLM's `--generation-config` / `--override-generation-config`.

    `auto`: the fields the model's generation_config sets explicitly, then the registry's defaults for the model;
    `vllm`: none (vLLM's neutral defaults). `overrides` win in both."""
    if mode not in ("auto", "vllm"):
        raise ValueError(f"generation_config must be 'auto' or 'vllm', got {mode!r}")
    found: dict[str, Any] = {}
    if mode == "auto":
        config = getattr(loaded.model, "generation_config", None)
        diff = config.to_diff_dict() if config is not None else {}
        found = {k: diff[k] for k in (*GENERATION_CONFIG_FIELDS, "max_new_tokens") if diff.get(k) is not None}
        source = REGISTRY.get(model_arg)
        if source is not None:
            found.update(source.generation_defaults)
    found.update(overrides or {})
    return found


class GenerationHandle:
    """Async iterator over a request's `PromptLogprobs` / `TokenDelta` events; `cancel()` stops the worker."""

    def __init__(self, job: Job, events: "asyncio.Queue[object]") -> None:
        self._job = job
        self._events = events

    def __aiter__(self) -> "GenerationHandle":
        return self

    async def __anext__(self) -> TokenDelta | PromptLogprobs:
        event = await self._events.get()
        if event is _DONE:
            raise StopAsyncIteration
        if isinstance(event, ModelServerError):
            raise event
        assert isinstance(event, (TokenDelta, PromptLogprobs))
        return event

    def cancel(self) -> None:
        self._job.cancelled = True


@dataclass
class _Adapter:
    name: str
    path: str
    internal: str


@dataclass
class _Row:
    """One decoding choice in the running batch; rows are in the batch's KV row order."""

    decoder: ChoiceDecoder
    adapter: str | None  # internal adapter name; None = the base model
    logits: Any  # next-token logits [V] (from the prefill, then from the last batched step)


class Engine:
    def __init__(
        self,
        loaded: LoadedModel,
        *,
        served_model_name: str | None = None,
        model_arg: str | None = None,
        cache_dir: Path | None = None,
        device: str = "auto",
        max_model_len: int | None = None,
        max_loras: int = 8,
        max_num_seqs: int = 16,
        dtype: str = "auto",
        generation_config: str = "auto",
        override_generation_config: dict[str, Any] | None = None,
    ) -> None:
        self.model_arg = model_arg or loaded.name
        self.served_model_name = served_model_name or loaded.name
        self.tokenizer = loaded.tokenizer
        self.device = loaded.device
        self._cache_dir = cache_dir
        self._device_pref = device
        self._dtype_pref = dtype
        self.dtype = next(loaded.model.parameters()).dtype
        self.generation_defaults = generation_defaults(
            loaded, self.model_arg, generation_config, override_generation_config
        )
        if self.generation_defaults:
            logger.info(
                "Default sampling parameters for omitted fields (generation config): %s", self.generation_defaults
            )
        config = loaded.model.config
        derived = int(getattr(config, "max_position_embeddings", 0) or 2048)
        if max_model_len is not None and max_model_len > derived:
            raise ValueError(f"max_model_len={max_model_len} exceeds the model's max_position_embeddings={derived}")
        self.max_model_len = max_model_len or derived
        self.vocab_size = min(len(self.tokenizer), int(config.vocab_size))
        self.max_loras = max_loras
        if max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be at least 1, got {max_num_seqs}")
        self.max_num_seqs = max_num_seqs
        self.eos_ids = self._collect_eos_ids(loaded)
        self._slots = AdapterSlots(loaded.model)
        self._adapters: dict[str, _Adapter] = {}  # every registered adapter (no limit, as in vLLM)
        self._resident: OrderedDict[str, None] = OrderedDict()  # internal names attached to the model, LRU first
        self._internal_names = (f"lora{i}" for i in itertools.count(1))
        self._sleep_level: int | None = None
        self._sleeping_tags: set[str] = set()
        self._sleep_requested = False
        self.metrics = ServerMetrics(self.served_model_name, self.max_model_len, str(self.dtype).removeprefix("torch."))
        self._jobs: queue.Queue[Job | Callable[[], None] | None] = queue.Queue()
        self._pending: deque[Job | Callable[[], None] | None] = deque()  # taken from _jobs, not yet started
        self._rows: list[_Row] = []  # the running batch
        self._batch = PaddedKVBatch(config)
        self._worker: threading.Thread | None = None

    @classmethod
    def load(cls, model: str, *, cache_dir: Path, device: str = "auto", dtype: str = "auto", **kwargs: Any) -> "Engine":
        from claas.core.models import pick_device

        torch_dtype = resolve_dtype(dtype, pick_device(device))
        loaded = load_model(model, cache_dir, device, dtype=torch_dtype)
        return cls(loaded, model_arg=model, cache_dir=cache_dir, device=device, dtype=dtype, **kwargs)

    @staticmethod
    def _collect_eos_ids(loaded: LoadedModel) -> frozenset[int]:
        ids = {loaded.tokenizer.eos_token_id}
        gen_eos = getattr(getattr(loaded.model, "generation_config", None), "eos_token_id", None)
        ids.update(gen_eos if isinstance(gen_eos, list) else [gen_eos])
        return frozenset(i for i in ids if i is not None)

    # ---- worker thread -------------------------------------------------------------------------------------------

    def start(self) -> None:
        if self._worker is None:
            self._worker = threading.Thread(target=self._worker_main, name="claas-modelserver-engine", daemon=True)
            self._worker.start()

    def shutdown(self) -> None:
        if self._worker is not None:
            self._jobs.put(None)
            self._worker.join(timeout=30)
            self._worker = None

    def _worker_main(self) -> None:
        """The scheduler: start queued requests while the batch has room, run queued control jobs (adapter loads,
        sleep, wake) once the batch is empty, and advance every running choice by one token per step."""
        while True:
            self._take_queued(block=not self._rows and not self._pending)
            if not self._dispatch():
                return
            if self._rows:
                self._decode_step()

    def _take_queued(self, block: bool) -> None:
        if block:
            self._pending.append(self._jobs.get())
        while True:
            try:
                self._pending.append(self._jobs.get_nowait())
            except queue.Empty:
                return

    def _dispatch(self) -> bool:
        """Start what can start, in arrival order; False once the shutdown marker is reached."""
        while self._pending:
            head = self._pending[0]
            if isinstance(head, Job):
                if not self._admissible(head):
                    return True
                self._pending.popleft()
                self._admit(head)
                continue
            if self._rows:  # a control job changes what running requests read: it waits until they are done
                return True
            self._pending.popleft()
            if head is None:
                return False
            try:
                head()
            except Exception:  # control jobs report their own errors; this only guards the thread
                logger.exception("engine job failed")
        return True

    async def _call(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the worker thread (after everything queued before it) and await its result."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()

        def settle(ok: bool, value: Any) -> None:
            if not future.done():
                future.set_result(value) if ok else future.set_exception(value)

        def job() -> None:
            try:
                result = fn()
            except BaseException as exc:
                loop.call_soon_threadsafe(settle, False, exc)
            else:
                loop.call_soon_threadsafe(settle, True, result)

        self.start()
        self._jobs.put(job)
        return await future

    # ---- adapters ------------------------------------------------------------------------------------------------

    @property
    def adapters(self) -> dict[str, str]:
        """Loaded adapters: public name -> path."""
        return {a.name: a.path for a in list(self._adapters.values())}  # snapshot: the worker may mutate it

    async def load_adapter(self, name: str, path: str, *, load_inplace: bool = False) -> None:
        if not name or not path:
            raise BadRequest("Both 'lora_name' and 'lora_path' must be provided.", err_type="InvalidUserInput")
        if name == self.served_model_name:
            raise BadRequest(
                f"The lora adapter name '{name}' is the base model's name; an adapter may not shadow the base model.",
                param="lora_name",
                err_type="InvalidUserInput",
            )
        await self._call(lambda: self._load_adapter(name, path, load_inplace))

    def _load_adapter(self, name: str, path: str, load_inplace: bool) -> None:
        existing = self._adapters.get(name)
        if existing is not None and not load_inplace:
            raise BadRequest(
                f"The lora adapter '{name}' has already been loaded. If you want to load the adapter in place, "
                "set 'load_inplace' to True.",
                err_type="InvalidUserInput",
            )
        if not looks_like_adapter_dir(path):
            raise NotFound(f"Loading lora {name} failed: No adapter found for {path}")
        try:
            weights = self._slots.validate(path)  # also at sleep level 2, where nothing can be attached to check it
        except AdapterLoadError as exc:
            raise InternalError(f"Loading lora {name} failed: {exc}") from exc
        if existing is not None and existing.internal in self._resident and self._copy_inplace(existing, path, weights):
            logger.info("Loaded LoRA adapter in place: name '%s', path '%s'", name, path)
            return
        adapter = _Adapter(name, path, next(self._internal_names))
        if self._slots.model is not None:  # at level 2 there is no model: attach on first use after wake
            try:
                self._make_resident(adapter)  # attach now, so a broken adapter is refused at load time
            except AdapterLoadError as exc:
                raise InternalError(f"Loading lora {name} failed: {exc}") from exc
        self._adapters[name] = adapter
        if existing is not None:
            self._evict(existing.internal)
        logger.info("Loaded LoRA adapter: name '%s', path '%s'", name, path)

    def _copy_inplace(self, adapter: _Adapter, path: str, weights: dict[str, Any]) -> bool:
        """Copy the weights at `path` into the resident `adapter`; False when they need new modules instead."""
        started = time.perf_counter()
        try:
            copied = self._slots.copy_inplace(adapter.internal, path, weights)
        except AdapterLoadError as exc:
            self._evict(adapter.internal)  # never serve a possibly partial copy: re-read from its path on next use
            raise InternalError(f"Loading lora {adapter.name} failed: {exc}") from exc
        if copied:
            adapter.path = path
            self._resident.move_to_end(adapter.internal)
            logger.info("in-place copy of %s took %.1f ms", adapter.name, (time.perf_counter() - started) * 1000)
        return copied

    def _make_resident(self, adapter: _Adapter, in_use: frozenset[str | None] = frozenset()) -> None:
        """Attach `adapter` if it is not attached, detaching the least recently used beyond `max_loras` (never one
        in `in_use`, the adapters of the running batch; `_admissible` ensures there is one to spare).

        Like vLLM, registered adapters are unlimited; only `max_loras` of them hold weights at once, and an evicted
        one is re-read from its path the next time a request names it.
        """
        if adapter.internal in self._resident:
            self._resident.move_to_end(adapter.internal)
            return
        while len(self._resident) >= self.max_loras:
            victim = next(name for name in self._resident if name not in in_use)
            del self._resident[victim]
            self._slots.detach(victim)
        self._slots.attach(adapter.internal, adapter.path)
        self._resident[adapter.internal] = None

    def _evict(self, internal: str) -> None:
        self._resident.pop(internal, None)
        self._slots.detach(internal)

    async def unload_adapter(self, name: str) -> None:
        if not name:
            message = "'lora_name' needs to be provided to unload a LoRA adapter."
            raise BadRequest(message, param="lora_name", err_type="InvalidUserInput")
        await self._call(lambda: self._unload_adapter(name))

    def _unload_adapter(self, name: str) -> None:
        adapter = self._adapters.pop(name, None)
        if adapter is None:
            raise NotFound(f"The lora adapter '{name}' cannot be found.")
        self._evict(adapter.internal)
        logger.info("Removed LoRA adapter: name '%s'", name)

    # ---- sleep / wake --------------------------------------------------------------------------------------------

    @property
    def is_sleeping(self) -> bool:
        return bool(self._sleeping_tags)

    async def sleep(self, level: int) -> None:
        if level not in (1, 2):
            raise BadRequest(f"level must be 1 or 2, got {level}.", param="level")
        self._sleep_requested = True  # new generation requests get 503 from now on; queued ones finish first
        try:
            await self._call(lambda: self._sleep(level))
        except BaseException:
            self._sleep_requested = bool(self._sleeping_tags)
            raise

    def _sleep(self, level: int) -> None:
        import torch

        if self._sleeping_tags:
            logger.warning("Engine is already sleeping.")
            return
        if level == 1:
            if self.device.type == "cuda":
                self._slots.model.to("cpu")
                torch.cuda.empty_cache()
        else:
            self._slots.drop_all()
            self._resident.clear()
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        self._sleep_level = level
        self._sleeping_tags = set(SLEEP_TAGS)
        self.metrics.set_sleep_level(level)
        logger.info("engine asleep (level %d)", level)

    async def wake_up(self, tags: list[str] | None = None) -> None:
        await self._call(lambda: self._wake_up(tags))

    def _wake_up(self, tags: list[str] | None = None) -> None:
        if not self._sleeping_tags:
            logger.warning("Engine is not sleeping.")
            self._sleep_requested = False
            return
        wanted = set(tags) if tags else set(self._sleeping_tags)
        unknown = wanted - self._sleeping_tags
        if unknown:  # vLLM's executor: a tag that is not asleep makes the whole call a logged no-op
            logger.warning("Tags %s are not in sleeping tags %s", sorted(unknown), sorted(self._sleeping_tags))
            return
        if "weights" in wanted:
            self._wake_weights()
        self._sleeping_tags -= wanted
        if self._sleeping_tags:
            logger.info("engine partly awake; still sleeping: %s", sorted(self._sleeping_tags))
            return
        self._sleep_level = None
        self._sleep_requested = False
        self.metrics.set_sleep_level(None)
        logger.info("engine awake")

    def _wake_weights(self) -> None:
        if self._sleep_level == 1 and self.device.type == "cuda":
            self._slots.model.to(self.device)
        elif self._sleep_level == 2:
            if self._cache_dir is None:
                raise InternalError("cannot wake from sleep level 2: the engine was built without a cache_dir")
            dtype = resolve_dtype(self._dtype_pref, self.device)
            loaded = load_model(self.model_arg, self._cache_dir, self._device_pref, dtype=dtype)
            self._slots.reset(loaded.model)
            self._resident.clear()  # adapters are re-attached from their paths when next used

    def check_awake(self) -> None:
        if self._sleeping_tags or self._sleep_requested:
            raise Unavailable(
                "The model server is sleeping (POST /sleep was called); generation is unavailable until POST /wake_up.",
            )

    # ---- generation ----------------------------------------------------------------------------------------------

    def submit(self, inp: GenerationInput) -> GenerationHandle:
        """Queue a generation request (FIFO); iterate the handle for its events. Raises 503 while asleep."""
        self.check_awake()
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[object] = asyncio.Queue()

        def emit(event: object) -> None:
            loop.call_soon_threadsafe(events.put_nowait, event)

        job = Job(inp, emit=emit)
        self.metrics.waiting.inc()
        self.start()  # idempotent; lets apps run without their lifespan (e.g. httpx.ASGITransport)
        self._jobs.put(job)
        return GenerationHandle(job, events)

    def _adapter_of(self, job: Job) -> _Adapter | None:
        if job.inp.adapter is None:
            return None
        adapter = self._adapters.get(job.inp.adapter)
        if adapter is None:
            raise NotFound(f"The model `{job.inp.adapter}` does not exist.", param="model")
        return adapter

    def _admissible(self, job: Job) -> bool:
        """Whether `job` can join the running batch now: room for its choices, and its adapter resident or a slot
        free of running requests to load it into (an empty batch always admits; errors surface at admission)."""
        if job.cancelled or not self._rows:
            return True
        if len(self._rows) + job.inp.params.n > self.max_num_seqs:
            return False
        adapter = self._adapters.get(job.inp.adapter) if job.inp.adapter is not None else None
        if adapter is None or adapter.internal in self._resident or len(self._resident) < self.max_loras:
            return True
        in_use = self._adapters_in_use()
        return any(name not in in_use for name in self._resident)

    def _adapters_in_use(self) -> frozenset[str | None]:
        """Internal names of the adapters the running batch decodes with (None for base rows)."""
        return frozenset(row.adapter for row in self._rows)

    def _admit(self, job: Job) -> None:
        """Prefill `job`'s prompt and add its choices to the running batch (or finish it: cancelled, failed)."""
        import torch

        metrics = self.metrics
        metrics.waiting.dec()
        if job.cancelled:
            metrics.request_success["abort"].inc()
            job.emit(_DONE)
            return
        metrics.running.inc()
        job.scheduled = time.monotonic()
        metrics.queue_time.observe(job.scheduled - job.submitted)
        params, prompt = job.inp.params, job.inp.prompt_ids
        try:
            if self._sleeping_tags:
                self.check_awake()
            adapter = self._adapter_of(job)
            internal = adapter.internal if adapter is not None else None
            if adapter is not None:
                try:
                    self._make_resident(adapter, self._adapters_in_use())
                except AdapterLoadError as exc:
                    message = f"LoRA adapter '{adapter.name}' could not be re-read from {adapter.path}: {exc}"
                    raise InternalError(message) from exc
            with torch.inference_mode():
                lm = self._slots.use(internal)
                cache, logits, prompt_lps = prefill(lm, prompt, self.device, params.prompt_logprobs)
                self._batch.add(cache, copies=params.n)
        except Exception as exc:
            self._fail(job, exc)
            self._finish(job)
            return
        metrics.prompt_tokens.inc(len(prompt))
        metrics.request_prompt_tokens.observe(len(prompt))
        metrics.prefix_cache_queries.inc(len(prompt))  # no prefix cache: every queried token misses
        metrics.iteration_tokens.observe(len(prompt))
        if prompt_lps is not None:
            job.emit(PromptLogprobs(prompt_lps))
        width = int(logits.shape[-1])
        for index in range(params.n):  # choice i of a request with seed s uses seed s + i, as vLLM's n does
            seed = None if params.seed is None else params.seed + index
            self._rows.append(_Row(ChoiceDecoder(self, job, index, seed, width), internal, logits))
        job.open_choices = params.n
        self._report_cache_usage()

    def _decode_step(self) -> None:
        """Sample one token for every running choice, then run ONE forward for all that continue."""
        import torch

        keep: list[int] = []
        tokens: list[int] = []
        with torch.inference_mode():
            for i, row in enumerate(self._rows):
                job = row.decoder.job
                if job.cancelled or job.failed:
                    self._close(row, None)
                    continue
                try:
                    token = row.decoder.advance(row.logits)
                except Exception as exc:
                    self._fail(job, exc)
                    self._close(row, None)
                    continue
                if token is None:
                    self._close(row, row.decoder.finish_reason)
                    continue
                keep.append(i)
                tokens.append(token)
            self._rows = [self._rows[i] for i in keep]
            self._batch.keep(keep)
            if not self._rows:
                self._report_cache_usage()
                return
            try:
                logits = self._forward(tokens)
            except Exception as exc:  # the whole batch shares this forward: every request in it fails
                for row in self._rows:
                    self._fail(row.decoder.job, exc)
                    self._close(row, None)
                self._rows = []
                self._batch.keep([])
                self._report_cache_usage()
                return
        for row, row_logits in zip(self._rows, logits):
            row.logits = row_logits
        self.metrics.iteration_tokens.observe(len(tokens))
        self._report_cache_usage()

    def _forward(self, tokens: list[int]) -> Any:
        """One decode forward for the batch: one adapter (or none) for all rows, or PEFT's per-row adapters."""
        adapters = [row.adapter for row in self._rows]
        if len(set(adapters)) == 1:
            return self._batch.step(self._slots.use(adapters[0]), tokens)
        return self._batch.step(self._slots.mixed(adapters), tokens)

    def _fail(self, job: Job, exc: BaseException) -> None:
        """Report `exc` to the request (once) and stop its other choices."""
        if job.failed:
            return
        job.failed = True
        if not isinstance(exc, ModelServerError):
            logger.exception("generation failed", exc_info=exc)
            exc = InternalError(f"generation failed: {type(exc).__name__}: {exc}")
        job.emit(exc)

    def _close(self, row: _Row, reason: str | None) -> None:
        """A choice left the batch: finished (`reason`), or cancelled / failed (None)."""
        job = row.decoder.job
        if reason is not None:
            self.metrics.request_success[reason].inc()
        elif not job.failed:  # cancelled by the client: count the abort once per request
            job.failed = True
            self.metrics.request_success["abort"].inc()
        job.open_choices -= 1
        if job.open_choices == 0:
            self._finish(job)

    def _finish(self, job: Job) -> None:
        metrics = self.metrics
        finished = time.monotonic()
        metrics.running.dec()
        metrics.e2e.observe(finished - job.submitted)
        metrics.inference_time.observe(finished - job.scheduled)
        first = job.first_token if job.first_token is not None else finished
        metrics.prefill_time.observe(first - job.scheduled)
        metrics.decode_time.observe(finished - first)
        metrics.request_preemptions.observe(0)
        metrics.params_n.observe(job.inp.params.n)
        metrics.params_max_tokens.observe(job.inp.params.max_tokens)
        job.emit(_DONE)

    def _report_cache_usage(self) -> None:
        """`vllm:kv_cache_usage_perc`: tokens held over the token budget (`max_num_seqs` x `max_model_len`)."""
        self.metrics.kv_cache_usage.set(self._batch.tokens() / (self.max_num_seqs * self.max_model_len))
