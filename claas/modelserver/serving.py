"""Chat and text completions: request → validated engine input → vLLM-shaped JSON or SSE stream.

Each request is validated completely before it is queued, so caller mistakes are 400/404 with vLLM's messages, never
500. Streaming waits for the engine's first event before the HTTP response starts, so a request that cannot run
(server asleep, adapter unloaded meanwhile) still gets a proper status code; later failures are sent in the stream as
`data: {"error": ...}` followed by `data: [DONE]`, as vLLM does. A client that disconnects cancels its request.

Not here: tokenization and prompt checks (prompts.py), JSON shapes (responses.py), routes (app.py).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

from claas.modelserver import prompts, responses
from claas.modelserver.engine import GenerationHandle, GenerationInput, PromptLogprobs, TokenDelta
from claas.modelserver.errors import BadRequest, InternalError, ModelServerError
from claas.modelserver.responses import ChoiceState, new_id, now, sse, usage
from claas.modelserver.sampling import build_sampling_params, check_unsupported

if TYPE_CHECKING:
    from claas.modelserver.engine import Engine
    from claas.modelserver.protocol import ChatCompletionRequest, CompletionRequest

logger = logging.getLogger(__name__)
Disconnected = Callable[[], Awaitable[bool]]


async def _collect(handles: list[GenerationHandle], n: int, disconnected: Disconnected | None):
    """Run handles to completion; returns per handle (choices, prompt logprobs). Cancels all on disconnect."""

    async def drain(handle: GenerationHandle) -> tuple[list[ChoiceState], list | None]:
        choices = [ChoiceState() for _ in range(n)]
        prompt_lps = None
        async for event in handle:
            if isinstance(event, PromptLogprobs):
                prompt_lps = event.positions
                continue
            choice = choices[event.index]
            choice.text += event.text
            choice.token_ids.extend(event.token_ids)
            if event.logprobs:
                choice.logprobs.extend(event.logprobs)
            if event.finish_reason is not None:
                choice.finish_reason, choice.stop_reason = event.finish_reason, event.stop_reason
        return choices, prompt_lps

    async def watch() -> None:
        while disconnected is not None and not await disconnected():
            await asyncio.sleep(0.25)
        for handle in handles:
            handle.cancel()

    watcher = asyncio.ensure_future(watch())
    try:
        return [await drain(handle) for handle in handles]
    finally:
        watcher.cancel()
        for handle in handles:
            handle.cancel()


async def _first(handle: GenerationHandle) -> TokenDelta | PromptLogprobs | None:
    try:
        return await handle.__anext__()
    except StopAsyncIteration:
        return None


def _error_chunk(exc: BaseException) -> str:
    if not isinstance(exc, ModelServerError):
        logger.exception("streaming failed", exc_info=exc)
        exc = InternalError(f"{type(exc).__name__}: {exc}")
    return sse(exc.body())


# ---- chat -------------------------------------------------------------------------------------------------------


async def chat_completion(
    engine: "Engine", req: "ChatCompletionRequest", disconnected: Disconnected | None = None
) -> dict[str, Any] | AsyncIterator[str]:
    adapter = prompts.resolve_adapter(engine, req.model)
    model_name = adapter or engine.served_model_name
    check_unsupported(req)
    prompts.check_tools(req.tools, req.tool_choice)
    top = req.top_logprobs or 0
    if top and not req.logprobs:
        raise BadRequest("when using `top_logprobs`, `logprobs` must be set to true.", param="top_logprobs")
    text = prompts.render_chat(
        engine,
        req.messages,
        add_generation_prompt=req.add_generation_prompt,
        continue_final_message=req.continue_final_message,
        tools=req.tools,
        documents=req.documents,
        chat_template=req.chat_template,
        chat_template_kwargs=req.chat_template_kwargs,
    )
    ids = prompts.encode(engine, text, add_special_tokens=req.add_special_tokens)
    ids = prompts.truncate(ids, req.truncate_prompt_tokens, engine.max_model_len)
    requested, param = req.requested_max_tokens
    prompts.check_context(engine, len(ids), requested, param)
    max_tokens = requested if requested is not None else engine.max_model_len - len(ids)
    if requested is None and "max_new_tokens" in engine.generation_defaults:  # vLLM: generation_config caps it
        max_tokens = min(max_tokens, int(engine.generation_defaults["max_new_tokens"]))
    params = build_sampling_params(
        req,
        max_tokens=max_tokens,
        max_tokens_param=param,
        logprobs=top if req.logprobs else None,
        logprobs_param="top_logprobs",
        vocab_size=engine.vocab_size,
        defaults=engine.generation_defaults,
    )
    role = "assistant" if req.add_generation_prompt else req.messages[-1].role
    echo_prefix = ""
    if req.echo and req.messages[-1].role == role:
        last = req.messages[-1].content
        echo_prefix = last if isinstance(last, str) else "\n".join(p.get("text", "") for p in last or [])
    handle = engine.submit(GenerationInput(ids, params, adapter))
    if req.stream:
        first = await _first(handle)
        return _chat_stream(engine, req, handle, first, ids, model_name, role, echo_prefix, top)
    ((choices, prompt_lps),) = await _collect([handle], params.n, disconnected)
    return {
        "id": new_id("chatcmpl"),
        "object": "chat.completion",
        "created": now(),
        "model": model_name,
        "choices": [
            {
                "index": i,
                "message": {
                    "role": role,
                    "content": echo_prefix + c.text,
                    "refusal": None,
                    "annotations": None,
                    "audio": None,
                    "function_call": None,
                    "reasoning": None,
                },
                "logprobs": responses.chat_logprobs(engine, c.logprobs, top) if req.logprobs else None,
                "finish_reason": c.finish_reason,
                "stop_reason": c.stop_reason,
                "token_ids": c.token_ids if req.return_token_ids else None,
            }
            for i, c in enumerate(choices)
        ],
        "service_tier": None,
        "system_fingerprint": None,
        "usage": usage(len(ids), sum(len(c.token_ids) for c in choices)),
        "prompt_logprobs": (
            responses.prompt_logprobs(engine, prompt_lps, params.prompt_logprobs or 0) if prompt_lps else None
        ),
        "prompt_token_ids": ids if req.return_token_ids else None,
        "kv_transfer_params": None,
    }


async def _chat_stream(
    engine: "Engine",
    req: "ChatCompletionRequest",
    handle: GenerationHandle,
    first: TokenDelta | PromptLogprobs | None,
    ids: list[int],
    model_name: str,
    role: str,
    echo_prefix: str,
    top: int,
) -> AsyncIterator[str]:
    base = {"id": new_id("chatcmpl"), "object": "chat.completion.chunk", "created": now(), "model": model_name}
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    continuous = bool(req.stream_options and req.stream_options.continuous_usage_stats)
    n = req.n or 1
    generated = [0] * n
    try:
        for i in range(n):
            chunk = {
                **base,
                "choices": [
                    {"index": i, "delta": {"role": role, "content": ""}, "logprobs": None, "finish_reason": None}
                ],
            }
            if req.return_token_ids:
                chunk["prompt_token_ids"] = ids
            if continuous:
                chunk["usage"] = usage(len(ids), 0)
            yield sse(chunk)
            if echo_prefix:
                yield sse(
                    {
                        **base,
                        "choices": [
                            {"index": i, "delta": {"content": echo_prefix}, "logprobs": None, "finish_reason": None}
                        ],
                    }
                )
        pending = [first] if first is not None else []
        async for event in _chain(pending, handle):
            if not isinstance(event, TokenDelta):
                continue
            generated[event.index] += len(event.token_ids)
            choice: dict[str, Any] = {
                "index": event.index,
                "delta": {"content": event.text},
                "logprobs": responses.chat_logprobs(engine, event.logprobs, top) if event.logprobs else None,
                "finish_reason": event.finish_reason,
            }
            if event.finish_reason is not None:
                choice["stop_reason"] = event.stop_reason
            if req.return_token_ids:
                choice["token_ids"] = event.token_ids
            chunk = {**base, "choices": [choice]}
            if continuous:
                chunk["usage"] = usage(len(ids), generated[event.index])
            yield sse(chunk)
        if include_usage:
            yield sse({**base, "choices": [], "usage": usage(len(ids), sum(generated))})
    except Exception as exc:
        yield _error_chunk(exc)
    finally:
        handle.cancel()
    yield sse("[DONE]")


async def _chain(pending: list, handle: GenerationHandle) -> AsyncIterator[Any]:
    for event in pending:
        yield event
    async for event in handle:
        yield event


# ---- completions ------------------------------------------------------------------------------------------------


def _completion_prompts(engine: "Engine", req: "CompletionRequest") -> list[tuple[list[int], str | None]]:
    """(token ids, text or None) per prompt; `prompt` is a string, ids, or a list of either."""
    prompt = req.prompt
    if prompt is None or prompt == "" or prompt == []:
        raise BadRequest("Either prompt or prompt_embeds must be provided and non-empty.", param="prompt")
    raw: list[Any] = [prompt] if isinstance(prompt, str) or all(isinstance(p, int) for p in prompt) else list(prompt)
    out: list[tuple[list[int], str | None]] = []
    for item in raw:
        if isinstance(item, str):
            ids = prompts.encode(engine, item, add_special_tokens=req.add_special_tokens)
            text: str | None = item
            if not ids:
                raise BadRequest("Either prompt or prompt_embeds must be provided and non-empty.", param="prompt")
        else:
            ids = [int(t) for t in item]
            prompts.check_token_ids(engine, ids, param="prompt")
            text = None
        out.append((prompts.truncate(ids, req.truncate_prompt_tokens, engine.max_model_len), text))
    return out


async def completion(
    engine: "Engine", req: "CompletionRequest", disconnected: Disconnected | None = None
) -> dict[str, Any] | AsyncIterator[str]:
    adapter = prompts.resolve_adapter(engine, req.model)
    model_name = adapter or engine.served_model_name
    check_unsupported(req)
    if req.suffix is not None:
        raise BadRequest("suffix is not currently supported", param="suffix")
    items = _completion_prompts(engine, req)
    requested = 16 if req.max_tokens is None else req.max_tokens
    for ids, _ in items:
        prompts.check_context(engine, len(ids), requested, "max_tokens")
    echo_only = bool(req.echo) and requested == 0  # vLLM scores the prompt and samples one ignored token
    params = build_sampling_params(
        req,
        max_tokens=1 if echo_only else requested,
        max_tokens_param="max_tokens",
        logprobs=req.logprobs,
        logprobs_param="logprobs",
        vocab_size=engine.vocab_size,
        defaults=engine.generation_defaults,
    )
    if req.echo and params.prompt_logprobs is None and params.logprobs is not None:
        from dataclasses import replace

        params = replace(params, prompt_logprobs=params.logprobs)
    texts = [text if text is not None else engine.tokenizer.decode(ids) for ids, text in items]
    handles = [engine.submit(GenerationInput(ids, params, adapter)) for ids, _ in items]
    if req.stream:
        try:
            first = await _first(handles[0])
        except BaseException:
            for h in handles:
                h.cancel()
            raise
        return _completion_stream(engine, req, handles, first, items, texts, model_name, echo_only)
    results = await _collect(handles, params.n, disconnected)
    choices_json = []
    n_generated = 0
    for (ids, _), text, (choices, prompt_lps) in zip(items, texts, results):
        for c in choices:
            n_generated += len(c.token_ids)
            if req.echo:
                out_ids = ids if echo_only else ids + c.token_ids
                out_lps = (prompt_lps or []) if echo_only else (prompt_lps or []) + list(c.logprobs)
                out_text = text if echo_only else text + c.text
            else:
                out_ids, out_lps, out_text = c.token_ids, list(c.logprobs), c.text
            choices_json.append(
                {
                    "index": len(choices_json),
                    "text": out_text,
                    "logprobs": (
                        responses.completion_logprobs(engine, out_ids, out_lps, params.logprobs)
                        if params.logprobs is not None
                        else None
                    ),
                    "finish_reason": c.finish_reason,
                    "stop_reason": c.stop_reason,
                    "token_ids": c.token_ids if req.return_token_ids else None,
                    "prompt_logprobs": (
                        responses.prompt_logprobs(engine, prompt_lps, params.prompt_logprobs or 0)
                        if prompt_lps
                        else None
                    ),
                    "prompt_token_ids": ids if req.return_token_ids else None,
                }
            )
    return {
        "id": new_id("cmpl"),
        "object": "text_completion",
        "created": now(),
        "model": model_name,
        "choices": choices_json,
        "service_tier": None,
        "system_fingerprint": None,
        "usage": usage(sum(len(ids) for ids, _ in items), n_generated),
        "kv_transfer_params": None,
    }


async def _completion_stream(
    engine: "Engine",
    req: "CompletionRequest",
    handles: list[GenerationHandle],
    first: TokenDelta | PromptLogprobs | None,
    items: list[tuple[list[int], str | None]],
    texts: list[str],
    model_name: str,
    echo_only: bool,
) -> AsyncIterator[str]:
    base = {"id": new_id("cmpl"), "object": "text_completion", "created": now(), "model": model_name}
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    continuous = include_usage and bool(req.stream_options and req.stream_options.continuous_usage_stats)
    n = req.n or 1
    top = req.logprobs
    total_generated = 0
    try:
        for p, (handle, (ids, _), text) in enumerate(zip(handles, items, texts)):
            pending = [first] if p == 0 and first is not None else []
            started = [False] * n
            offsets = [0] * n
            generated = [0] * n
            prompt_lps: list | None = None
            async for event in _chain(pending, handle):
                if isinstance(event, PromptLogprobs):
                    prompt_lps = event.positions
                    continue
                total_generated += len(event.token_ids)
                i = event.index
                out_text, out_ids, out_lps = event.text, list(event.token_ids), list(event.logprobs or [])
                if req.echo and not started[i]:  # vLLM puts the prompt in the first chunk of each choice
                    echoed_lps: list = list(prompt_lps or [])
                    out_text = text if echo_only else text + out_text
                    out_ids = ids if echo_only else ids + out_ids
                    out_lps = echoed_lps if echo_only else echoed_lps + out_lps
                choice: dict[str, Any] = {
                    "index": p * n + i,
                    "text": out_text,
                    "logprobs": (
                        responses.completion_logprobs(engine, out_ids, out_lps, top, offsets[i])
                        if top is not None
                        else None
                    ),
                    "finish_reason": event.finish_reason,
                    "stop_reason": event.stop_reason,
                }
                if req.return_token_ids:
                    choice["prompt_token_ids"] = ids if not started[i] else None
                    choice["token_ids"] = event.token_ids
                started[i] = True
                offsets[i] += len(out_text)
                chunk: dict[str, Any] = {**base, "choices": [choice]}
                if continuous:  # vLLM: this prompt's tokens and what this choice has generated so far
                    generated[i] += len(event.token_ids)
                    chunk["usage"] = usage(len(ids), generated[i])
                yield sse(chunk)
        if include_usage:
            yield sse({**base, "choices": [], "usage": usage(sum(len(ids) for ids, _ in items), total_generated)})
    except Exception as exc:
        yield _error_chunk(exc)
    finally:
        for handle in handles:
            handle.cancel()
    yield sse("[DONE]")
