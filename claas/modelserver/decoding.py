"""Per-request decoding on the worker thread: the prompt's prefill, then one choice a token at a time.

`prefill` runs the prompt (`logits_to_keep=1` unless prompt logprobs are wanted; then in chunks of positions so memory
stays O(chunk x vocab)). A `ChoiceDecoder` produces one choice a token at a time: adjust the logits (min_tokens,
logit_bias, penalties), sample (greedy or seeded), compute raw logprobs only when asked, detokenize incrementally,
apply EOS / `stop_token_ids` / stop strings / length, and hand every token to `job.emit` as a `TokenDelta` (the
engine forwards it to the request's asyncio queue). It does not run the model: the engine's batch does, for all
running choices at once, so a choice's tokens do not depend on what else is decoding beside it.

Must run under `torch.inference_mode()` (the engine does it).

Not here: queueing, batching, adapters, sleep (engine.py, kvbatch.py); HTTP shapes (serving.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from claas.modelserver.kvbatch import new_cache
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
    failed: bool = False  # ended early (error or abort, already reported): its remaining choices are dropped
    open_choices: int = 0  # choices still decoding; the job is done when it reaches 0 after admission


class DecodeContext(Protocol):
    """What a choice decoder needs from the engine."""

    tokenizer: Any
    device: "torch.device"
    max_model_len: int
    metrics: "ServerMetrics"
    eos_ids: frozenset[int]


def prefill(lm: Any, ids: list[int], device: "torch.device", prompt_top: int | None) -> tuple[Any, Any, list | None]:
    """Run the prompt; return (cache, logits of the last position [V], prompt logprobs or None)."""
    import torch

    cache = new_cache(lm.config)
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


class ChoiceDecoder:
    """Choice `index` of a request, one token per `advance`: adjust the logits, sample, detokenize, check stops, emit.

    The engine calls `advance` with the logits of the position after the last token (from the prefill, then from
    each batched decode step) and feeds the returned token to the next step; it checks `job.cancelled` before each
    call, so a disconnected client stops costing compute within one token."""

    def __init__(self, ctx: DecodeContext, job: Job, index: int, seed: int | None, vocab_width: int) -> None:
        import torch

        params = job.inp.params
        prompt = job.inp.prompt_ids
        self.job = job
        self.index = index
        self.finish_reason: str | None = None
        self._ctx = ctx
        self._params = params
        self._generator = None if params.greedy else make_generator(seed, ctx.device)
        self._detok = IncrementalDetokenizer(ctx.tokenizer, prompt, skip_special_tokens=params.skip_special_tokens)
        self._stops = StopStringTracker(params.stop, include_stop_str=params.include_stop_str_in_output)
        self._eos = frozenset() if params.ignore_eos else ctx.eos_ids
        self._stop_ids = frozenset(params.stop_token_ids)
        banned = torch.tensor(sorted(ctx.eos_ids | self._stop_ids), dtype=torch.long, device=ctx.device)  # min_tokens
        self._adjust = LogitsAdjuster(params, prompt, banned, vocab_width)
        self._budget = min(params.max_tokens, ctx.max_model_len - len(prompt))
        self._step = 0
        self._last = time.monotonic()

    def advance(self, logits: "torch.Tensor") -> int | None:
        """Sample from `logits` [V] and emit the token; return it to feed the model next, or None when finished."""
        params, metrics, stops, step = self._params, self._ctx.metrics, self._stops, self._step
        token = sample_token(self._adjust(logits, step), params, self._generator)
        self._adjust.observe(token)
        lps = (
            [position_logprobs(logits, token, params.logprobs, with_rank=False)]
            if params.logprobs is not None
            else None
        )
        finish: str | None = None
        stop_reason: int | str | None = None
        if token in self._eos or token in self._stop_ids:
            # vLLM: EOS and stop_token_ids end the choice; the id stays in token_ids but is not detokenized
            finish, stop_reason = "stop", (token if token in self._stop_ids else None)
            text, _ = stops.add(self._detok.flush())
            text += stops.flush()
        else:
            text, matched = stops.add(self._detok.push(token))
            if matched is not None:
                finish, stop_reason = "stop", matched
            elif step == self._budget - 1:
                finish = "length"
                tail, _ = stops.add(self._detok.flush())
                text += tail + stops.flush()
        now = time.monotonic()
        if step == 0:
            metrics.ttft.observe(now - self.job.submitted)
            if self.job.first_token is None:
                self.job.first_token = now
        else:
            metrics.itl.observe(now - self._last)
        self._last = now
        self._step += 1
        metrics.generation_tokens.inc()
        self.job.emit(TokenDelta(self.index, text, [token], lps, finish, stop_reason))
        if finish is not None:
            metrics.request_generation_tokens.observe(step + 1)
            self.finish_reason = finish
            return None
        return token
