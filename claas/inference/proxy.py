"""The inference proxy: forwards OpenAI-compatible requests to the inference server and records what was served.

For every request the server is asked for the sampled tokens' ids and logprobs (`return_token_ids`, `logprobs`);
they go into the completion cache (exact on-policy data for feedback) and are removed from the reply unless the
client asked for them. Streams are relayed chunk by chunk as the server produces them; the cache entry is written
when the stream ends, before `[DONE]` reaches the client. Closing the relay (client disconnect) closes the upstream
response, which makes the server abort the generation.

`model` is a lora_id or the base model and is forwarded as is. If the server answers 404 for a model the training
engine knows, the adapter is loaded and the request retried once (the server may have restarted and lost it).

Not here: HTTP framing (claas.routes.inference), the HTTP client (claas.inference.vllm).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from claas.auth import AuthScope
from claas.core.lora_ids import InvalidLoraIdError
from claas.errors import ClaasError, InvalidRequestError, NotFoundError
from claas.inference.base import InferenceBackend
from claas.inference.cache import CachedCompletion, CompletionCache
from claas.inference.context import ContextFitter
from claas.inference.helpers import SSE_DONE, ThinkStripper, sse_event, strip_think
from claas.inference.replies import (
    ChoiceAccumulator,
    accumulate,
    full_text,
    prompt_logprob_entry,
    request_messages,
    shape_chunk,
    shape_reply,
)
from claas.inference.sleep import SleepCoordinator
from claas.inference.wire import ChatCompletionRequest, CompletionRequest, ReplyOptions, ScoreRequest
from claas.observability import Metrics
from claas.training.engine.base import TrainingEngine

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class JsonReply:
    body: dict[str, Any]
    completion_id: str | None


@dataclass
class StreamReply:
    chunks: AsyncIterator[bytes]  # SSE-framed bytes, ending with `data: [DONE]`
    completion_id: str | None


class InferenceProxy:
    def __init__(
        self,
        inference: InferenceBackend,
        cache: CompletionCache,
        engine: TrainingEngine | None,
        metrics: Metrics | None = None,
        *,
        sleep: SleepCoordinator | None = None,
        sleep_wait_s: float = 120.0,
        context_overflow: str = "error",
    ) -> None:
        self.inference = inference
        self.cache = cache
        self.engine = engine
        self.metrics = metrics
        self.sleep = sleep
        self.sleep_wait_s = sleep_wait_s
        self.context_overflow = context_overflow  # "error": the server's 400; "trim": fit it (claas.inference.context)

    # --- routes' entry points ------------------------------------------------------------------------------------

    async def chat(
        self, request: ChatCompletionRequest, scope: AuthScope, *, strip_thinking: bool = False
    ) -> JsonReply | StreamReply:
        return await self._serve(request, scope, strip_thinking=strip_thinking, chat=True)

    async def completions(
        self, request: CompletionRequest, scope: AuthScope, *, strip_thinking: bool = False
    ) -> JsonReply | StreamReply:
        return await self._serve(request, scope, strip_thinking=strip_thinking, chat=False)

    async def _serve(
        self, request: ChatCompletionRequest | CompletionRequest, scope: AuthScope, *, strip_thinking: bool, chat: bool
    ) -> JsonReply | StreamReply:
        await self._check_access(scope, request.model)
        if chat and self.context_overflow == "trim" and isinstance(request, ChatCompletionRequest):
            async with self._admitted():
                fitted = await ContextFitter(self.inference).fit(request.model_dump(exclude_unset=True))
            if fitted is not None:  # sent, cached and trained on as fitted
                request = request.model_copy(update={"messages": fitted})
        payload = request.to_upstream_payload()
        want = request.reply_options(strip_thinking=strip_thinking)
        if request.stream:
            stream = self.inference.stream_chat_completions if chat else self.inference.stream_completions
            async with self._admitted():  # until the first chunk: then the server counts the stream as running
                first, chunks = await self._open_stream(stream, payload, request.model)
            relay = self._relay(first, chunks, request, want, chat=chat, owner=scope.prefix)
            return StreamReply(relay, first.get("id") if first else None)
        call = self.inference.chat_completions if chat else self.inference.completions
        async with self._admitted():
            response = await self._retry_on_unknown_adapter(request.model, lambda: call(payload))
        self._cache_reply(response, request, want, chat=chat, owner=scope.prefix)
        shape_reply(response, want, chat=chat)
        return JsonReply(response, response.get("id"))

    async def models(self, scope: AuthScope) -> dict[str, Any]:
        cards = await self.inference.models()
        if not scope.is_admin:  # a scoped key sees base models and its own adapters
            cards = [card for card in cards if card.get("parent") is None or scope.allows(str(card.get("id")))]
        return {"object": "list", "data": cards}

    async def score(self, request: ScoreRequest, scope: AuthScope) -> dict[str, Any]:
        """Logprob of each token of `completion` after `messages` rendered with the chat template (generation
        prompt added), read from the server's `prompt_logprobs` of the concatenated token ids."""
        await self._check_access(scope, request.model)

        async def run() -> tuple[list[int], list[int], dict[str, Any]]:
            prompt_ids = await self.inference.tokenize_messages(
                request.messages, add_generation_prompt=True, model=request.model
            )
            completion_ids = await self.inference.tokenize_text(request.completion, add_special_tokens=False)
            if not completion_ids:
                raise InvalidRequestError("completion tokenizes to zero tokens", param="completion")
            body = {
                "model": request.model,
                "prompt": prompt_ids + completion_ids,
                "max_tokens": 1,
                "temperature": 0.0,
                "prompt_logprobs": 1,  # the actual token's logprob is always included; 1 is accepted everywhere
            }
            return prompt_ids, completion_ids, await self.inference.completions(body)

        async with self._admitted():
            prompt_ids, completion_ids, response = await self._retry_on_unknown_adapter(request.model, run)
        positions = (response.get("choices") or [{}])[0].get("prompt_logprobs") or []
        tokens: list[str] = []
        logprobs: list[float] = []
        for offset, token_id in enumerate(completion_ids):
            entry = prompt_logprob_entry(positions, len(prompt_ids) + offset, token_id)
            tokens.append(str(entry.get("decoded_token", "")))
            logprobs.append(float(entry["logprob"]))
        total = math.fsum(logprobs)
        return {
            "model": request.model,
            "tokens": tokens,
            "logprobs": logprobs,
            "token_ids": completion_ids,
            "prompt_token_count": len(prompt_ids),
            "sum_logprob": total,
            "mean_logprob": total / len(logprobs),
        }

    # --- adapters and access -------------------------------------------------------------------------------------

    async def _is_known_lora(self, model: str) -> bool:
        if self.engine is None:
            return False
        try:
            return await self.engine.lora_exists(model)
        except InvalidLoraIdError:  # e.g. a model name with characters no lora id may have: not an adapter
            return False

    async def _check_access(self, scope: AuthScope, model: str | None) -> None:
        """A scoped key may use the server's base models and adapters under its prefix; nothing else, whether the
        store knows the adapter or not (a deleted adapter may still be loaded on the server)."""
        if scope.is_admin or model is None or scope.allows(model):
            return
        if model in await served_base_models(self.inference):
            return
        scope.require(model, param="model")

    def _admitted(self) -> contextlib.AbstractAsyncContextManager[None]:
        """While a training step holds the server asleep, wait for its wake (bounded) instead of failing; then
        count the request as in transit, so a step starting meanwhile drains it instead of sleeping under it."""
        if self.sleep is None:
            return contextlib.nullcontext()
        return self.sleep.admitted(self.sleep_wait_s)

    async def _retry_on_unknown_adapter(self, model: str | None, call: Callable[[], Awaitable[T]]) -> T:
        try:
            return await call()
        except NotFoundError:
            if model is None or not await self._is_known_lora(model):
                raise
        assert self.engine is not None
        try:
            ref = await self.engine.lora_runtime_ref(model)
            await self.inference.ensure_lora_adapter(ref.name, ref.path)
        except ClaasError:
            self._count_recovery("failed")
            raise
        self._count_recovery("loaded")
        logger.info("inference server did not know adapter %s: loaded it and retried", model)
        return await call()

    def _count_recovery(self, result: str) -> None:
        if self.metrics is not None:
            self.metrics.adapter_recoveries.labels(result=result).inc()

    async def _open_stream(
        self,
        opener: Callable[[dict[str, Any]], AsyncIterator[dict[str, Any]]],
        payload: dict[str, Any],
        model: str | None,
    ) -> tuple[dict[str, Any] | None, AsyncIterator[dict[str, Any]]]:
        """Start the upstream stream and wait for its first chunk, so that an error status (404, 400, 503) becomes
        a normal error response instead of a broken stream."""

        async def first_chunk() -> tuple[dict[str, Any] | None, AsyncIterator[dict[str, Any]]]:
            chunks = opener(payload)
            try:
                return await anext(chunks, None), chunks
            except BaseException:
                await _aclose(chunks)
                raise

        return await self._retry_on_unknown_adapter(model, first_chunk)

    # --- streams ---------------------------------------------------------------------------------------------------

    async def _relay(
        self,
        first: dict[str, Any] | None,
        chunks: AsyncIterator[dict[str, Any]],
        request: ChatCompletionRequest | CompletionRequest,
        want: ReplyOptions,
        *,
        chat: bool,
        owner: str | None,
    ) -> AsyncIterator[bytes]:
        accs: dict[int, ChoiceAccumulator] = {}
        strippers: dict[int, ThinkStripper] = {}
        completion_id = first.get("id") if first else None
        model = request.model or (first.get("model") if first else None)
        prompt_ids: list[int] | None = None
        finished = False
        try:
            chunk = first
            while chunk is not None:
                if "error" in chunk:  # vLLM reports a failure mid-stream as an SSE event with an error object
                    yield sse_event(chunk)
                    break
                prompt_ids = chunk.get("prompt_token_ids") or prompt_ids
                for choice in chunk.get("choices") or ():
                    accumulate(accs.setdefault(choice.get("index", 0), ChoiceAccumulator()), choice, chat=chat)
                shape_chunk(chunk, want, strippers, chat=chat)
                yield sse_event(chunk)
                chunk = await anext(chunks, None)
            else:
                finished = True
        except ClaasError as exc:  # the connection to the server broke mid-stream: tell the client, in-band
            yield sse_event(exc.to_body())
        finally:
            await _aclose(chunks)
        if finished and completion_id:
            for index, acc in sorted(accs.items()):
                reasoning = "".join(acc.reasoning)
                text = (f"<think>{reasoning}</think>" if reasoning else "") + "".join(acc.text)
                self._store(
                    completion_id if index == 0 else f"{completion_id}-{index}",
                    model=model or "",
                    messages=request_messages(request, index),
                    prompt_ids=acc.prompt_token_ids if acc.prompt_token_ids is not None else prompt_ids,
                    token_ids=acc.token_ids if acc.complete_ids else None,
                    logprobs=acc.logprobs,
                    text=text,
                    want=want,
                    owner=owner,
                )
        yield SSE_DONE

    # --- cache -----------------------------------------------------------------------------------------------------

    def _cache_reply(
        self,
        response: dict[str, Any],
        request: ChatCompletionRequest | CompletionRequest,
        want: ReplyOptions,
        *,
        chat: bool,
        owner: str | None,
    ) -> None:
        completion_id = response.get("id")
        if not completion_id:
            return
        if not chat and getattr(request, "echo", False):
            return  # echo mixes prompt and answer in text and logprobs: a scoring call, not a served answer
        model = request.model or response.get("model") or ""
        for position, choice in enumerate(response.get("choices") or ()):
            index = choice.get("index", position)
            if chat:
                message = choice.get("message") or {}
                text = full_text(message.get("content"), message)
                logprobs = [item.get("logprob") for item in ((choice.get("logprobs") or {}).get("content") or ())]
                prompt_ids = response.get("prompt_token_ids")
            else:
                text = choice.get("text") or ""
                logprobs = list((choice.get("logprobs") or {}).get("token_logprobs") or ())
                prompt_ids = choice.get("prompt_token_ids")
            self._store(
                completion_id if index == 0 else f"{completion_id}-{index}",
                model=model,
                messages=request_messages(request, index),
                prompt_ids=prompt_ids,
                token_ids=choice.get("token_ids"),
                logprobs=logprobs,
                text=text,
                want=want,
                owner=owner,
            )

    def _store(
        self,
        completion_id: str,
        *,
        model: str,
        messages: list[dict[str, Any]],
        prompt_ids: list[int] | None,
        token_ids: list[int] | None,
        logprobs: list[Any],
        text: str,
        want: ReplyOptions,
        owner: str | None,
    ) -> None:
        if prompt_ids is None or token_ids is None or len(logprobs) != len(token_ids) or None in logprobs:
            logger.debug("not caching %s: the server did not return exact token ids and logprobs", completion_id)
            return
        self.cache.put(
            CachedCompletion(
                completion_id=completion_id,
                model=model,
                messages=messages,
                prompt_token_ids=list(prompt_ids),
                response_token_ids=list(token_ids),
                response_logprobs=[float(value) for value in logprobs],
                response_text=text,
                visible_text=strip_think(text) if want.strip_thinking else text,
                owner=owner,
            )
        )


BASE_MODELS_MAX_AGE_S = 10.0
_base_models: weakref.WeakKeyDictionary[InferenceBackend, tuple[float, frozenset[str]]] = weakref.WeakKeyDictionary()


async def served_base_models(inference: InferenceBackend) -> frozenset[str]:
    """Ids of the server's base models (model cards without a `parent`, i.e. not LoRA adapters), remembered per
    client for BASE_MODELS_MAX_AGE_S: access checks ask on every scoped request; base models change only on restart."""
    now = time.monotonic()
    known = _base_models.get(inference)
    if known is None or now - known[0] > BASE_MODELS_MAX_AGE_S:
        cards = await inference.models()
        known = _base_models[inference] = (now, frozenset(str(c.get("id")) for c in cards if c.get("parent") is None))
    return known[1]


async def _aclose(iterator: AsyncIterator[Any]) -> None:
    aclose = getattr(iterator, "aclose", None)
    if aclose is not None:
        await aclose()
