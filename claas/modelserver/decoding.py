"""The decode loop for one request on the worker thread: prefill, then one token per forward with a KV cache.

`prefill` runs the prompt (`logits_to_keep=1` unless prompt logprobs are wanted; then in chunks of positions so memory
stays O(chunk x vocab)). `decode_choice` generates one choice: adjust the logits (min_tokens, logit_bias,
penalties), sample (greedy or seeded), compute raw logprobs only when asked, detokenize incrementally, apply EOS /
`stop_token_ids` / stop strings / length, and hand every token to `job.emit` as a `TokenDelta` (the engine forwards
it to the request's asyncio queue). It checks `job.cancelled` before every step, so a disconnected client stops
costing compute within one token.

Must run under `torch.inference_mode()` with the request's adapter selected (the engine does both).

Not here: queueing, adapters, sleep (engine.py); HTTP shapes (serving.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from claas.modelserver.sampling import (
    LogitsAdjuster,
    PositionLogprobs,
    SamplingParams,
    make_generator,
    position_logprobs,
    rows_logprobs,
    sample_token,
)
from claas.modelserver.textstream import IncrementalDetokenizer, StopStringTracker

if TYPE_CHECKING:
    import torch

    from claas.modelserver.metrics import ServerMetrics

_PROMPT_CHUNK = 512  # positions per forward when all prompt logits are needed


@dataclass(frozen=True)
class GenerationInput:
    prompt_ids: list[int]
    params: SamplingParams
    adapter: str | None = None  # public adapter name; None = the base model


@dataclass
class TokenDelta:
    """One step of one choice: new text, the new token, its logprobs; `finish_reason` set on the last step."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[PositionLogprobs] | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class PromptLogprobs:
    """Per prompt position: None for the first, else the actual token's logprob/rank plus the top-K."""

    positions: list[PositionLogprobs | None]


@dataclass
class Job:
    """A queued request as the worker sees it."""

    inp: GenerationInput
    emit: Callable[[object], None]
    submitted: float = field(default_factory=time.monotonic)
    scheduled: float = 0.0  # when the worker started it
    first_token: float | None = None
    cancelled: bool = False


class DecodeContext(Protocol):
    """What the decode loop needs from the engine."""

    tokenizer: Any
    device: "torch.device"
    max_model_len: int
    metrics: "ServerMetrics"
    eos_ids: frozenset[int]


def prefill(lm: Any, ids: list[int], device: "torch.device", prompt_top: int | None) -> tuple[Any, Any, list | None]:
    """Run the prompt; return (cache, logits of the last position [V], prompt logprobs or None)."""
    import torch
    from transformers.cache_utils import DynamicCache

    cache = DynamicCache(config=lm.config)
    if prompt_top is None:
        out = lm(input_ids=torch.tensor([ids], device=device), cache=cache, use_cache=True, logits_to_keep=1)
        return cache, out.logits[0, -1], None
    positions: list[PositionLogprobs | None] = [None]
    last = None
    for start in range(0, len(ids), _PROMPT_CHUNK):
        chunk = ids[start : start + _PROMPT_CHUNK]
        logits = lm(input_ids=torch.tensor([chunk], device=device), cache=cache, use_cache=True).logits[0]  # [C, V]
        targets = ids[start + 1 : start + 1 + len(chunk)]  # the next token of each position; the very last has none
        if targets:
            positions.extend(rows_logprobs(logits[: len(targets)], targets, prompt_top))
        last = logits[-1]
    return cache, last, positions


def decode_choice(
    ctx: DecodeContext, lm: Any, job: Job, index: int, cache: Any, logits: Any, seed: int | None
) -> str | None:
    """Generate choice `index` from the prefilled `cache`; return its finish reason, or None when cancelled."""
    import torch

    params = job.inp.params
    prompt = job.inp.prompt_ids
    metrics = ctx.metrics
    generator = None if params.greedy else make_generator(seed, ctx.device)
    detok = IncrementalDetokenizer(ctx.tokenizer, prompt, skip_special_tokens=params.skip_special_tokens)
    stops = StopStringTracker(params.stop, include_stop_str=params.include_stop_str_in_output)
    eos = frozenset() if params.ignore_eos else ctx.eos_ids
    stop_ids = frozenset(params.stop_token_ids)
    banned = torch.tensor(sorted(ctx.eos_ids | stop_ids), dtype=torch.long, device=ctx.device)  # for min_tokens
    adjust = LogitsAdjuster(params, prompt, banned, int(logits.shape[-1]))
    budget = min(params.max_tokens, ctx.max_model_len - len(prompt))
    last = time.monotonic()
    for step in range(budget):
        if job.cancelled:
            return None
        token = sample_token(adjust(logits, step), params, generator)
        adjust.observe(token)
        lps = (
            [position_logprobs(logits, token, params.logprobs, with_rank=False)]
            if params.logprobs is not None
            else None
        )
        finish: str | None = None
        stop_reason: int | str | None = None
        if token in eos or token in stop_ids:
            # vLLM: EOS and stop_token_ids end the choice; the id stays in token_ids but is not detokenized
            finish, stop_reason = "stop", (token if token in stop_ids else None)
            text, _ = stops.add(detok.flush())
            text += stops.flush()
        else:
            text, matched = stops.add(detok.push(token))
            if matched is not None:
                finish, stop_reason = "stop", matched
            elif step == budget - 1:
                finish = "length"
                tail, _ = stops.add(detok.flush())
                text += tail + stops.flush()
        now = time.monotonic()
        if step == 0:
            metrics.ttft.observe(now - job.submitted)
            if job.first_token is None:
                job.first_token = now
        else:
            metrics.itl.observe(now - last)
            metrics.iteration_tokens.observe(1)
        last = now
        metrics.generation_tokens.inc()
        metrics.kv_cache_usage.set((len(prompt) + step + 1) / ctx.max_model_len)
        job.emit(TokenDelta(index, text, [token], lps, finish, stop_reason))
        if finish is not None:
            metrics.request_generation_tokens.observe(step + 1)
            return finish
        step_ids = torch.tensor([[token]], device=ctx.device)
        logits = lm(input_ids=step_ids, cache=cache, use_cache=True).logits[0, -1]  # [V]
    return "length"  # not reached: callers validate max_tokens >= 1 and len(prompt) < max_model_len
