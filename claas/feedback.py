"""The feedback transaction: resolve -> lock -> sleep -> distill (+save) -> wake -> reload adapter -> log.

Reads top to bottom in `run_feedback`. Each phase is timed; a failure in a phase becomes a PhaseFailedError naming
it, after the inference server has been woken (when we put it to sleep) and the failure has been written to the
feedback log. The previous adapter stays intact because the engine saves atomically and evicts a failed step.

Wake before reload: vLLM cannot load adapters reliably while asleep, so the server is woken first and the adapter is
then swapped (unload -> load, a fresh adapter id so no stale prefix-cache blocks). The reply is sent only after the
swap, so the next request is served by the updated adapter.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from claas.auth import OPEN_SCOPE, AuthScope
from claas.core.chat import last_user_text, message_text
from claas.core.config import Settings
from claas.core.lora_ids import LATEST, InvalidLoraIdError, validate_lora_id
from claas.core.models import training_config_for
from claas.core.types import DistillBatch, FeedbackItem, OrchestrationConfig, TrainingConfig, TrainingExample
from claas.errors import (
    ClaasError,
    NotFoundError,
    PayloadTooLargeError,
    PhaseFailedError,
    ServingStaleError,
    UnprocessableError,
    as_claas_error,
)
from claas.inference.base import InferenceBackend
from claas.inference.cache import CachedCompletion, CompletionCache
from claas.inference.helpers import normalize_text, text_key
from claas.inference.proxy import served_base_models
from claas.inference.sleep import SleepCoordinator
from claas.inference.turns import served_answer_candidates, user_turn_matches
from claas.inference.vllm import VllmClient
from claas.logs import current_request_id, new_request_id
from claas.lora_locks import LoraLocks
from claas.observability import Metrics
from claas.training.engine.base import TrainingEngine
from claas.training.storage import LoraStoreError

logger = logging.getLogger(__name__)

DRAIN_TIMEOUT_S = 30.0
RELOAD_ATTEMPTS = 3
RELOAD_BACKOFF_S = 0.5


class TrainingInputError(UnprocessableError):
    """The feedback cannot be trained on as sent (e.g. rollout_logprobs do not match the response tokens)."""


@dataclass
class FeedbackServices:
    settings: Settings
    engine: TrainingEngine
    inference: VllmClient
    cache: CompletionCache
    metrics: Metrics
    locks: LoraLocks
    sleep: SleepCoordinator = field(default_factory=SleepCoordinator)


def _item_messages(item: FeedbackItem) -> list[dict[str, Any]]:
    if isinstance(item.prompt, list):
        return item.prompt
    messages: list[dict[str, Any]] = []
    if item.system_prompt:
        messages.append({"role": "system", "content": item.system_prompt})
    messages.append({"role": "user", "content": item.prompt})
    return messages


def _system_text(messages: list[dict[str, Any]]) -> str | None:
    systems = [message_text(m.get("content")) for m in messages if m.get("role") in ("system", "developer")]
    return "\n".join(systems) if systems else None


def _same_conversation(item: FeedbackItem, entry: CachedCompletion) -> bool:
    """The feedback's prompt is the cached request's: the last user turn (normalized, or the words a chat client
    wrapped in an envelope, `claas.inference.turns`), and the system prompt too when the feedback gives one. No
    substring matching: "hi" is not "Summarise this...", and a prompt without a user turn matches only a request
    without one."""
    if isinstance(item.prompt, str):
        prompt_text, system = item.prompt, item.system_prompt
    else:
        prompt_text, system = last_user_text(item.prompt), _system_text(item.prompt)
        if item.system_prompt is not None:
            system = item.system_prompt
    if not user_turn_matches(prompt_text, last_user_text(entry.messages)):
        return False
    if system is not None:
        cached_system = _system_text(entry.messages)
        return cached_system is not None and normalize_text(system) == normalize_text(cached_system)
    return True


async def _usable(entry: CachedCompletion, lora_id: str, scope: AuthScope, engine: TrainingEngine) -> bool:
    """May feedback on `lora_id` from `scope` train on this cached conversation? Yes when this adapter served it;
    a base-model completion only when the same key scope asked for it; never one served by another adapter."""
    if entry.model == lora_id:
        return True
    if entry.owner != scope.prefix:
        return False
    try:
        return not await engine.lora_exists(entry.model)
    except InvalidLoraIdError:  # not even a lora id: a base model name
        return True


async def _cached_for(
    item: FeedbackItem, cache: CompletionCache, scope: AuthScope, engine: TrainingEngine
) -> CachedCompletion | None:
    if item.completion_id:
        entry = cache.get(item.completion_id)
        # Another scope's completion reads as unknown: its existence is not the caller's business.
        if entry is None or (entry.model != item.lora_id and entry.owner != scope.prefix):
            raise NotFoundError(
                f"completion {item.completion_id!r} is not in the completion cache (expired/unknown)",
                param="completion_id",
            )
        if not await _usable(entry, item.lora_id, scope, engine):
            raise UnprocessableError(
                f"completion {item.completion_id!r} was served by {entry.model!r}, not by {item.lora_id!r}",
                param="completion_id",
            )
        served = (text_key(entry.response_text), text_key(entry.visible_text))
        if not any(text_key(text) in served for text in served_answer_candidates(item.response)):
            raise UnprocessableError(
                f"response differs from the text of completion {item.completion_id!r}; send the served answer "
                "or leave out completion_id to train on the text as sent",
                param="response",
            )
        if not _same_conversation(item, entry):
            raise UnprocessableError(
                f"prompt differs from the conversation of completion {item.completion_id!r}", param="prompt"
            )
        return entry
    # The shown answer, else the shown answer without trailing paragraphs a client appended (longest first).
    for shown in served_answer_candidates(item.response):
        candidates = [entry for entry in cache.candidates(shown) if _same_conversation(item, entry)]
        for entry in candidates:  # most recent first; this adapter's own completions before base-model ones
            if entry.model == item.lora_id:
                return cache.hit(entry)
        for entry in candidates:
            if await _usable(entry, item.lora_id, scope, engine):
                return cache.hit(entry)
    return cache.hit(None)


async def resolve_example(
    item: FeedbackItem, cache: CompletionCache, scope: AuthScope, engine: TrainingEngine
) -> TrainingExample:
    """Exact served tokens + rollout logprobs when the answer came through this gateway (and may be used by this
    caller for this adapter); otherwise text only."""
    cached = await _cached_for(item, cache, scope, engine)
    if cached is not None:
        return TrainingExample(
            messages=cached.messages,
            response_text=cached.response_text,
            feedback=item.feedback,
            prompt_token_ids=cached.prompt_token_ids,
            response_token_ids=cached.response_token_ids,
            rollout_logprobs=item.rollout_logprobs or cached.response_logprobs,
            source="cache",
            completion_id=cached.completion_id,
        )
    return TrainingExample(
        messages=_item_messages(item),
        response_text=item.response,
        feedback=item.feedback,
        rollout_logprobs=item.rollout_logprobs,
        source="tokenized",
    )


@dataclass
class Transaction:
    request_id: str
    lora_id: str
    timing_ms: dict[str, float] = field(default_factory=dict)
    slept: bool = False
    woke: bool = False
    phase: str = "resolve"
    token_counts: list[dict[str, int | None]] = field(default_factory=list)  # per example: prompt, response, feedback

    @contextlib.contextmanager
    def timed(self, phase: str, metrics: Metrics) -> Any:
        self.phase = phase
        started = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - started
            self.timing_ms[phase] = round(elapsed * 1000.0, 3)
            metrics.feedback_phase_seconds.labels(phase=phase).observe(elapsed)


async def run_feedback(
    services: FeedbackServices,
    items: list[FeedbackItem],
    orchestration: OrchestrationConfig,
    *,
    save_mode: Literal["in_place", "version"] = "in_place",
    scope: AuthScope = OPEN_SCOPE,
) -> dict[str, Any]:
    started = time.perf_counter()
    lora_id = validate_lora_id(items[0].lora_id)
    _check_one_training(items)
    # The HTTP request's id (its X-Request-ID): the response, the feedback log record and every log line share it.
    tx = Transaction(request_id=current_request_id() or new_request_id(), lora_id=lora_id)
    training = training_config_for(services.settings.base_model, items[0].training)
    metrics = services.metrics
    result: dict[str, Any] | None = None
    failure: BaseException | None = None
    examples: list[TrainingExample] = []
    try:
        with tx.timed("resolve", metrics):
            if not await services.engine.lora_exists(lora_id):
                raise NotFoundError(f"adapter {lora_id!r} does not exist; create it with POST /v1/lora/init")
            if lora_id in await served_base_models(services.inference):  # the server could never serve the update
                raise UnprocessableError(
                    f"adapter {lora_id!r} has the name of a base model on the inference server, which cannot load "
                    "it; create the adapter under another id",
                    param="lora_id",
                )
            examples = [await resolve_example(item, services.cache, scope, services.engine) for item in items]
            tx.token_counts = await _check_lengths(services, examples)
        lock_started = time.perf_counter()
        async with services.locks.hold(lora_id, services.settings.feedback_lock_timeout_s, services.engine):
            tx.timing_ms["lock_wait"] = round((time.perf_counter() - lock_started) * 1000.0, 3)
            metrics.lock_wait_seconds.observe(time.perf_counter() - lock_started)
            result = await _locked_phases(services, tx, examples, training, orchestration, save_mode)
    except BaseException as exc:
        failure = exc
        raise _as_api_error(exc, tx.phase, tx.request_id) from exc
    finally:
        tx.timing_ms["total"] = round((time.perf_counter() - started) * 1000.0, 3)
        status = "ok" if failure is None else "saved_not_served" if isinstance(failure, ServingStaleError) else "error"
        metrics.feedback_total.labels(status=status).inc()
        log_path = _write_log(services.settings.feedback_log_dir, tx, items, examples, result, failure)
        logger.info("feedback %s on %s: %s in %.0f ms (step %s)", tx.request_id, lora_id, status,
                    tx.timing_ms["total"], (result or {}).get("step"))
    return {
        "status": "ok",
        "request_id": tx.request_id,
        "lora_id": lora_id,
        "distill_result": result,
        "vllm": {"slept": tx.slept, "woke": tx.woke},
        "timing_ms": tx.timing_ms,
        "feedback_log_path": str(log_path),
        "batch_size": len(items),
        "sources": [example.source for example in examples],
    }


async def _locked_phases(
    services: FeedbackServices,
    tx: Transaction,
    examples: list[TrainingExample],
    training: TrainingConfig,
    orchestration: OrchestrationConfig,
    save_mode: Literal["in_place", "version"],
) -> dict[str, Any]:
    inference, metrics = services.inference, services.metrics
    policy = services.settings.sleep_during_training
    shares = policy == "always" or (policy == "auto" and services.engine.shares_inference_device)
    must_sleep = shares and orchestration.sleep_before
    registered = succeeded = False
    wake_failure: ClaasError | None = None
    try:
        if must_sleep:
            with tx.timed("sleep", metrics):
                tx.slept = True  # before the call: a sleep that times out may still happen, and must be undone
                try:
                    await services.sleep.acquire(
                        inference, level=orchestration.sleep_level, drain_timeout_s=DRAIN_TIMEOUT_S
                    )
                except BaseException:
                    tx.woke = not services.sleep.sleeping  # the coordinator woke it again
                    raise
                registered = True
        with tx.timed("distill", metrics):
            batch = DistillBatch(lora_id=tx.lora_id, examples=examples, training=training, save_mode=save_mode)
            distilled = await services.engine.distill(batch)
        # The engine saves inside its step; report that part separately.
        save_ms = distilled.timing_ms.get("save", 0.0)
        tx.timing_ms["save"] = save_ms
        tx.timing_ms["distill"] = round(tx.timing_ms["distill"] - save_ms, 3)
        succeeded = True
    finally:
        if registered:
            wake = orchestration.wake_after if succeeded else orchestration.wake_on_failure
            phase = tx.phase
            with tx.timed("wake", metrics):
                # The last step that needs the device wakes the server; an earlier one leaves that to it.
                try:
                    tx.woke = await services.sleep.release(inference, wake=wake)
                except ClaasError as exc:  # e.g. the server died during the step: it cannot be woken now
                    logger.warning("feedback %s: waking the inference server failed: %s", tx.request_id, exc.message)
                    wake_failure = exc  # a failed step keeps its own error; a saved one says it is not served
            if not succeeded:
                tx.phase = phase  # report the phase that failed, not the wake that followed it
    if wake_failure is not None:  # the step is saved: a retry must not train it again
        served = tx.lora_id if save_mode == "in_place" else f"{tx.lora_id}@{LATEST}"
        raise ServingStaleError(served, distilled.step, f"waking the inference server failed: {wake_failure.message}",
                                result=distilled.model_dump())
    with tx.timed("reload", metrics):
        if registered and orchestration.wake_after:  # adapters load on an awake server: wait for the last step
            await services.sleep.wait_awake(services.settings.feedback_lock_timeout_s)
        # In place: the adapter itself. A new version: `x@latest` now names it, so a server that has the alias
        # loaded must load it again (a version not loaded yet is loaded by the proxy on first use).
        served = tx.lora_id if save_mode == "in_place" else f"{tx.lora_id}@{LATEST}"
        if save_mode == "in_place" or served in {str(card.get("id")) for card in await inference.models()}:
            try:
                await reload_served_adapter(services, served)
            except ClaasError as exc:
                raise ServingStaleError(served, distilled.step, exc.message, result=distilled.model_dump()) from exc
    return distilled.model_dump()


async def reload_served_adapter(services: FeedbackServices, lora_id: str) -> None:
    """Swap the adapter on the inference server, retried with backoff: the step is saved already, so a transient
    failure here must not become a failed feedback that the client then trains again."""
    for attempt in range(RELOAD_ATTEMPTS):
        try:
            ref = await services.engine.lora_runtime_ref(lora_id)
            await services.inference.reload_lora_adapter(ref.name, ref.path)
            return
        except ClaasError as exc:
            if attempt == RELOAD_ATTEMPTS - 1:
                raise
            logger.warning("reloading %s on the inference server failed (attempt %d): %s", lora_id, attempt + 1,
                           exc.message)
            await asyncio.sleep(RELOAD_BACKOFF_S * 2**attempt)


def _check_one_training(items: list[FeedbackItem]) -> None:
    """A batch is one optimizer step, so it has one `training` config: items that disagree are refused instead of
    silently training with the first item's."""
    first = items[0].training
    for index, item in enumerate(items[1:], start=1):
        if item.training != first:
            raise UnprocessableError(
                f"requests.{index}.training differs from requests.0.training; a batch is one step with one "
                "training config (send the same one on every item, or separate requests)",
                param=f"requests.{index}.training",
            )


def _as_api_error(exc: BaseException, phase: str, request_id: str) -> BaseException:
    if isinstance(exc, ClaasError) or not isinstance(exc, Exception):
        return exc
    mapped = as_claas_error(exc)
    if mapped is not None:
        return mapped  # the store's 4xx errors (not found, invalid id, exists, locked)
    if isinstance(exc, ValueError) and not isinstance(exc, LoraStoreError) and phase in ("resolve", "distill"):
        return TrainingInputError(f"{phase}: {exc}")
    logger.error("feedback %s failed in phase %s", request_id, phase, exc_info=exc)
    return PhaseFailedError(phase, exc, ref=request_id)


async def _context_length(inference: InferenceBackend) -> int | None:
    """The inference server's context length (`max_model_len` of its base model cards), if it reports one."""
    lengths = [card.get("max_model_len") for card in await inference.models() if card.get("parent") is None]
    known = [int(n) for n in lengths if isinstance(n, int) and n > 0]
    return min(known) if known else None


#: Tokens a chat template adds around the text (role headers, a default system prompt) and per message.
TEMPLATE_ALLOWANCE_TOKENS = 64
PER_MESSAGE_TOKENS = 16


def _token_upper_bound(example: TrainingExample) -> int:
    """More tokens than the example can have: byte-level BPE tokens are at least one UTF-8 byte each (exact ids
    count as they are), plus the template's allowance."""
    if example.prompt_token_ids is not None and example.response_token_ids is not None:
        known = len(example.prompt_token_ids) + len(example.response_token_ids)
    else:
        texts = [message_text(m.get("content")) for m in example.messages] + [example.response_text]
        known = sum(len(text.encode()) for text in texts) + PER_MESSAGE_TOKENS * (len(example.messages) + 1)
    return known + len(example.feedback.encode()) + TEMPLATE_ALLOWANCE_TOKENS


async def _check_lengths(services: FeedbackServices, examples: list[TrainingExample]) -> list[dict[str, int | None]]:
    """Token counts of each example (the exact served ones when cached, else the server's tokenizer), refused with
    413 when prompt + feedback + response exceed CLAAS_MAX_TRAINING_TOKENS or the model's context. Runs before the
    lock and the sleep, so an oversized feedback costs no step and keeps no one waiting. An example whose byte
    length already proves it short is not sent to the tokenizer (counts it does not know stay None)."""
    inference = services.inference
    limit, source = services.settings.max_training_tokens, "CLAAS_MAX_TRAINING_TOKENS"
    context = await _context_length(inference)
    if context is not None and context < limit:
        limit, source = context, "the model's context length"
    counts: list[dict[str, int | None]] = []
    for index, example in enumerate(examples):
        if _token_upper_bound(example) <= limit:
            exact = example.prompt_token_ids is not None and example.response_token_ids is not None
            counts.append({
                "prompt": len(example.prompt_token_ids or ()) if exact else None,
                "response": len(example.response_token_ids or ()) if exact else None,
                "feedback": None,
            })
            continue
        if example.prompt_token_ids is not None and example.response_token_ids is not None:
            prompt, response = len(example.prompt_token_ids), len(example.response_token_ids)
        else:
            prompt = len(await inference.tokenize_messages(example.messages, add_generation_prompt=True))
            response = len(await inference.tokenize_text(example.response_text))
        feedback = len(await inference.tokenize_text(example.feedback))
        count: dict[str, int | None] = {"prompt": prompt, "response": response, "feedback": feedback}
        total = prompt + response + feedback
        if total > limit:
            parts = (("prompt", prompt), ("response", response), ("feedback", feedback))
            field_name = max(parts, key=lambda part: part[1])[0]
            where = f"requests.{index}." if len(examples) > 1 else ""
            raise PayloadTooLargeError(
                f"the feedback is {total} tokens (prompt {prompt} + response {response} + feedback {feedback}); "
                f"at most {limit} can be trained on ({source})",
                param=f"{where}{field_name}",
            )
        counts.append(count)
    return counts


def _trained_on(example: TrainingExample, counts: dict[str, int | None] | None) -> dict[str, Any]:
    """What the step trained on, for the log: where the tokens came from and how many."""
    counts = counts or {}
    return {
        "source": example.source,
        "completion_id": example.completion_id,
        "prompt_tokens": counts.get("prompt"),
        "response_tokens": counts.get("response"),
        "feedback_tokens": counts.get("feedback"),
        "trained_response": example.response_text,
    }


def _write_log(
    log_dir: Path,
    tx: Transaction,
    items: list[FeedbackItem],
    examples: list[TrainingExample],
    result: dict[str, Any] | None,
    failure: BaseException | None,
) -> Path:
    now = datetime.now(timezone.utc)
    record = {
        "request_id": tx.request_id,
        "timestamp": now.isoformat(),
        "lora_id": tx.lora_id,
        "status": "ok" if failure is None else "saved_not_served" if isinstance(failure, ServingStaleError)
        else "error",
        "error": None
        if failure is None
        else {"phase": tx.phase, "message": str(failure), "type": type(failure).__name__},
        "items": [
            {
                "prompt": item.prompt,
                "response": item.response,
                "feedback": item.feedback,
                **(_trained_on(examples[i], tx.token_counts[i] if i < len(tx.token_counts) else None)
                   if i < len(examples) else {"source": None}),
            }
            for i, item in enumerate(items)
        ],
        "distill_result": result,
        "vllm": {"slept": tx.slept, "woke": tx.woke},
        "timing_ms": tx.timing_ms,
    }
    day_dir = log_dir / now.strftime("%Y-%m-%d")
    day_dir.mkdir(parents=True, exist_ok=True)
    path = day_dir / f"{now.strftime('%H%M%S%f')}-{tx.request_id}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2, default=str))
    tmp.replace(path)
    return path
