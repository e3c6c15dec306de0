"""Sampling parameters (validated like vLLM's `SamplingParams`) and the per-token sampling and logprob maths.

`build_sampling_params` turns a chat or completion request into a frozen `SamplingParams`, raising `BadRequest` with
vLLM's messages and the offending field as `param` for out-of-range values. `sample_token` draws the next token
(greedy when temperature is 0; else temperature, top-k, top-p with a per-request `torch.Generator`).
`position_logprobs` computes the *raw* logprobs vLLM reports by default (`logprobs_mode=raw_logprobs`: log-softmax of
the unprocessed logits, before temperature/top-k/top-p).

Not here: the decode loop (engine.py), response formatting (serving.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from claas.modelserver.errors import BadRequest, too_many_logprobs

if TYPE_CHECKING:
    import torch

    from claas.modelserver.protocol import ChatCompletionRequest, CompletionRequest

MAX_LOGPROBS = 20  # vLLM's default --max-logprobs
MAX_N = 128
_GREEDY_EPS = 1e-5  # vLLM's _SAMPLING_EPS: below this temperature sampling is greedy


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 (or -1) disables
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: int | None = None  # top-K alternatives per sampled token; None = no logprobs at all
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS


def _unsupported(field: str) -> BadRequest:
    return BadRequest(f"`{field}` is not supported by the CLaaS model server.", param=field)


def check_unsupported(req: "ChatCompletionRequest | CompletionRequest") -> None:
    """Refuse options that would change outputs but that this server does not implement (instead of ignoring them)."""
    if req.frequency_penalty not in (None, 0.0):
        raise _unsupported("frequency_penalty")
    if req.presence_penalty not in (None, 0.0):
        raise _unsupported("presence_penalty")
    if req.repetition_penalty not in (None, 1.0):
        raise _unsupported("repetition_penalty")
    if req.min_p not in (None, 0.0):
        raise _unsupported("min_p")
    if req.logit_bias:
        raise _unsupported("logit_bias")
    if req.use_beam_search:
        raise _unsupported("use_beam_search")
    if req.response_format and req.response_format.get("type", "text") != "text":
        raise _unsupported("response_format")
    if req.stream_options and not req.stream:
        raise BadRequest("Stream options can only be defined when `stream=True`.", param="stream_options")


def _check_logprobs_count(value: int | None, *, kind: str, param: str, vocab_size: int) -> int | None:
    if value is None:
        return None
    if value < 0 and value != -1:
        raise BadRequest(f"`{param}` must be a positive value or -1.", param=param)
    requested = vocab_size if value == -1 else value
    if requested > MAX_LOGPROBS:
        raise too_many_logprobs(kind, requested, MAX_LOGPROBS, param)
    return requested


def build_sampling_params(
    req: "ChatCompletionRequest | CompletionRequest",
    *,
    max_tokens: int,
    max_tokens_param: str,
    logprobs: int | None,
    logprobs_param: str,
    vocab_size: int,
) -> SamplingParams:
    """Validate the sampling fields shared by chat and completions (messages as in vLLM's `_verify_args`)."""
    n = 1 if req.n is None else req.n
    if n < 1:
        raise BadRequest(f"n must be at least 1, got {n}.", param="n")
    if n > MAX_N:
        raise BadRequest(f"n must be at most {MAX_N}, got {n}.", param="n")
    temperature = 1.0 if req.temperature is None else req.temperature
    if not math.isfinite(temperature):
        raise BadRequest(f"temperature must be a finite number, got {temperature}.", param="temperature")
    if temperature < 0.0:
        raise BadRequest(f"temperature must be non-negative, got {temperature}.", param="temperature")
    if temperature > 2.0:
        raise BadRequest(f"temperature must be in [0, 2], got {temperature}.", param="temperature")
    top_p = 1.0 if req.top_p is None else req.top_p
    if not 0.0 < top_p <= 1.0:
        raise BadRequest(f"top_p must be in (0, 1], got {top_p}.", param="top_p")
    top_k = 0 if req.top_k is None else req.top_k
    if top_k < -1:
        raise BadRequest(f"top_k must be 0 (disable), or at least 1, got {top_k}.", param="top_k")
    if max_tokens < 1:
        raise BadRequest(f"{max_tokens_param} must be at least 1, got {max_tokens}.", param=max_tokens_param)
    if req.min_tokens < 0:
        raise BadRequest(f"min_tokens must be greater than or equal to 0, got {req.min_tokens}.", param="min_tokens")
    if req.min_tokens > max_tokens:
        raise BadRequest(
            f"min_tokens must be less than or equal to max_tokens={max_tokens}, got {req.min_tokens}.",
            param="min_tokens",
        )
    stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    if any(not s for s in stop):
        raise BadRequest("stop cannot contain an empty string.", param="stop")
    stop_token_ids = tuple(dict.fromkeys(req.stop_token_ids or ()))
    if any(t < 0 or t >= vocab_size for t in stop_token_ids):
        raise BadRequest(f"stop_token_ids must be token ids in [0, {vocab_size}).", param="stop_token_ids")
    if req.prompt_logprobs is not None and req.stream:
        raise BadRequest("`prompt_logprobs` are not available when `stream=True`.", param="prompt_logprobs")
    top = _check_logprobs_count(logprobs, kind="sample", param=logprobs_param, vocab_size=vocab_size)
    prompt_top = _check_logprobs_count(
        req.prompt_logprobs, kind="prompt", param="prompt_logprobs", vocab_size=vocab_size
    )
    seed = None if req.seed in (None, -1) else req.seed
    if seed is not None and not -(2**63) <= seed < 2**63:
        raise BadRequest(f"seed must fit in a signed 64-bit integer, got {seed}.", param="seed")
    params = SamplingParams(
        n=n,
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=max(top_k, 0),
        seed=seed,
        stop=stop,
        stop_token_ids=stop_token_ids,
        include_stop_str_in_output=req.include_stop_str_in_output,
        ignore_eos=req.ignore_eos,
        min_tokens=req.min_tokens,
        logprobs=top,
        prompt_logprobs=prompt_top,
        skip_special_tokens=req.skip_special_tokens,
    )
    if params.greedy and n > 1:
        raise BadRequest(f"n must be 1 when using greedy sampling, got {n}.", param="n")
    return params


def make_generator(seed: int | None, device: "torch.device") -> "torch.Generator":
    import random

    import torch

    generator = torch.Generator(device=device)
    generator.manual_seed((seed if seed is not None else random.getrandbits(63)) % (2**63))
    return generator


def sample_token(logits: "torch.Tensor", params: SamplingParams, generator: "torch.Generator | None") -> int:
    """Next token from one row of logits [V]: greedy, or temperature → top-k → top-p → multinomial."""
    import torch

    if params.greedy:
        return int(torch.argmax(logits))
    scores = logits.float() / params.temperature  # [V]
    if 0 < params.top_k < scores.numel():
        kth = torch.topk(scores, params.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True)
        probs = torch.softmax(sorted_scores, dim=-1)
        # drop a token when the mass strictly before it already reaches top_p (the first token always stays)
        drop = (torch.cumsum(probs, dim=-1) - probs) >= params.top_p
        sorted_scores = sorted_scores.masked_fill(drop, float("-inf"))
        scores = torch.empty_like(scores).scatter_(0, order, sorted_scores)
    probs = torch.softmax(scores, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


@dataclass(frozen=True)
class PositionLogprobs:
    """Raw logprob of the chosen token at one position, its rank, and the top-K alternatives (rank order)."""

    token_id: int
    logprob: float
    rank: int | None
    top_ids: list[int]
    top_logprobs: list[float]


def position_logprobs(logits: "torch.Tensor", token_id: int, top_k: int, *, with_rank: bool) -> PositionLogprobs:
    """Logprobs of the raw distribution at one position (logits [V], any dtype; computed in float32)."""
    import torch

    logp = torch.log_softmax(logits.float(), dim=-1)  # [V]
    chosen = logp[token_id]
    rank = int((logp > chosen).sum()) + 1 if with_rank else None
    if top_k > 0:
        values, ids = torch.topk(logp, top_k)
        top_ids, top_lps = ids.tolist(), values.tolist()
    else:
        top_ids, top_lps = [], []
    return PositionLogprobs(token_id, max(float(chosen), -9999.0), rank, top_ids, top_lps)


def rows_logprobs(logits: "torch.Tensor", targets: list[int], top_k: int) -> list[PositionLogprobs]:
    """`position_logprobs` for many positions at once (logits [C, V], one target per row), ranks included."""
    import torch

    logp = torch.log_softmax(logits.float(), dim=-1)  # [C, V]
    target = torch.tensor(targets, device=logp.device).unsqueeze(1)  # [C, 1]
    chosen = logp.gather(1, target)  # [C, 1]
    ranks = ((logp > chosen).sum(dim=-1) + 1).tolist()
    if top_k > 0:
        values, ids = torch.topk(logp, top_k, dim=-1)  # [C, K]
        top_ids, top_lps = ids.tolist(), values.tolist()
    else:
        top_ids, top_lps = [[] for _ in targets], [[] for _ in targets]
    chosen_list = chosen.squeeze(1).tolist()
    return [
        PositionLogprobs(t, max(lp, -9999.0), r, ti, tl)
        for t, lp, r, ti, tl in zip(targets, chosen_list, ranks, top_ids, top_lps)
    ]
