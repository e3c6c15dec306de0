"""Sampling parameters (validated like vLLM's `SamplingParams`) and the per-token sampling and logprob maths.

`build_sampling_params` turns a chat or completion request into a frozen `SamplingParams`, raising `BadRequest` with
vLLM's messages and the offending field as `param` for out-of-range values. Fields the request omits come from the
model's generation defaults (vLLM's `--generation-config auto`: temperature, top_p, top_k, min_p, repetition_penalty
from the model's generation_config), then vLLM's neutral values.

Per step, `LogitsAdjuster` applies what vLLM applies before sampling, in vLLM's order: min_tokens (EOS and stop ids
banned), `logit_bias` (clamped to [-100, 100]), then repetition penalty (prompt and output tokens: positive logits
divided, negative multiplied), frequency and presence penalties (output tokens only, OpenAI's definition).
`sample_token` draws the next token from the adjusted logits (greedy when temperature is 0; else temperature, min-p,
top-k, top-p with a per-request `torch.Generator`). `position_logprobs` computes the *raw* logprobs vLLM reports by
default (`logprobs_mode=raw_logprobs`: log-softmax of the unprocessed logits, before any of the above).

Not here: the decode loop (engine.py), response formatting (serving.py).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

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
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias in [-100, 100])
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

    @property
    def penalized(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0


#: Sampling fields vLLM takes from a model's generation_config when a request omits them (`get_diff_sampling_param`).
GENERATION_CONFIG_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def _unsupported(field: str) -> BadRequest:
    return BadRequest(f"`{field}` is not supported by the CLaaS model server.", param=field)


def check_unsupported(req: "ChatCompletionRequest | CompletionRequest") -> None:
    """Refuse options that would change outputs but that this server does not implement (instead of ignoring them)."""
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


def _out_of_vocab(ids: list[int], field: str, vocab_size: int) -> BadRequest:
    # vLLM's SamplingParams._validate_stop_token_ids / _validate_logit_bias wording
    return BadRequest(
        f"token_id(s) {ids} in {field} contain out-of-vocab token ids. Vocabulary size: {vocab_size}", param=field
    )


def _logit_bias(raw: dict[str, float] | None, vocab_size: int) -> tuple[tuple[int, float], ...]:
    if not raw:
        return ()
    bad_keys, parsed = [], {}
    for key, bias in raw.items():
        try:
            token = int(key)
        except ValueError:
            bad_keys.append(key)
            continue
        if not math.isfinite(bias):
            raise BadRequest(f"logit_bias for token {key} must be a finite number, got {bias}.", param="logit_bias")
        parsed[token] = min(100.0, max(-100.0, bias))
    if bad_keys:
        raise BadRequest(
            f"logit_bias contains key(s) that cannot be converted to integer token IDs: {bad_keys!r}",
            param="logit_bias",
        )
    invalid = [t for t in parsed if t < 0 or t >= vocab_size]
    if invalid:
        raise _out_of_vocab(invalid, "logit_bias", vocab_size)
    return tuple(parsed.items())


def build_sampling_params(
    req: "ChatCompletionRequest | CompletionRequest",
    *,
    max_tokens: int,
    max_tokens_param: str,
    logprobs: int | None,
    logprobs_param: str,
    vocab_size: int,
    defaults: Mapping[str, Any] | None = None,
) -> SamplingParams:
    """Validate the sampling fields shared by chat and completions (messages as in vLLM's `_verify_args`).

    `defaults` are the model's generation defaults for fields the request leaves out (vLLM's generation_config)."""
    defaults = defaults or {}

    def pick(value: Any, name: str, neutral: Any) -> Any:
        return value if value is not None else defaults.get(name, neutral)

    n = 1 if req.n is None else req.n
    if n < 1:
        raise BadRequest(f"n must be at least 1, got {n}.", param="n")
    if n > MAX_N:
        raise BadRequest(f"n must be at most {MAX_N}, got {n}.", param="n")
    temperature = float(pick(req.temperature, "temperature", 1.0))
    if not math.isfinite(temperature):
        raise BadRequest(f"temperature must be a finite number, got {temperature}.", param="temperature")
    if temperature < 0.0:
        raise BadRequest(f"temperature must be non-negative, got {temperature}.", param="temperature")
    if temperature > 2.0:
        raise BadRequest(f"temperature must be in [0, 2], got {temperature}.", param="temperature")
    top_p = float(pick(req.top_p, "top_p", 1.0))
    if not 0.0 < top_p <= 1.0:
        raise BadRequest(f"top_p must be in (0, 1], got {top_p}.", param="top_p")
    top_k = int(pick(req.top_k, "top_k", 0))
    if top_k < -1:
        raise BadRequest(f"top_k must be 0 (disable), or at least 1, got {top_k}.", param="top_k")
    min_p = float(pick(req.min_p, "min_p", 0.0))
    if not 0.0 <= min_p <= 1.0:
        raise BadRequest(f"min_p must be in [0, 1], got {min_p}.", param="min_p")
    presence = 0.0 if req.presence_penalty is None else req.presence_penalty
    if not -2.0 <= presence <= 2.0:
        raise BadRequest(f"presence_penalty must be in [-2, 2], got {presence}.", param="presence_penalty")
    frequency = 0.0 if req.frequency_penalty is None else req.frequency_penalty
    if not -2.0 <= frequency <= 2.0:
        raise BadRequest(f"frequency_penalty must be in [-2, 2], got {frequency}.", param="frequency_penalty")
    repetition = float(pick(req.repetition_penalty, "repetition_penalty", 1.0))
    if not math.isfinite(repetition):
        raise BadRequest(f"repetition_penalty must be a finite number, got {repetition}.", param="repetition_penalty")
    if repetition <= 0.0:
        raise BadRequest(f"repetition_penalty must be greater than zero, got {repetition}.", param="repetition_penalty")
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
    invalid_stop = [t for t in stop_token_ids if t < 0 or t >= vocab_size]
    if invalid_stop:
        raise _out_of_vocab(invalid_stop, "stop_token_ids", vocab_size)
    logit_bias = _logit_bias(req.logit_bias, vocab_size)
    if req.prompt_logprobs is not None and req.stream:
        raise BadRequest("`prompt_logprobs` are not available when `stream=True`.", param="prompt_logprobs")
    top = _check_logprobs_count(logprobs, kind="sample", param=logprobs_param, vocab_size=vocab_size)
    prompt_top = _check_logprobs_count(
        req.prompt_logprobs, kind="prompt", param="prompt_logprobs", vocab_size=vocab_size
    )
    seed = None if req.seed in (None, -1) else req.seed
    if seed is not None and not -(2**63) <= seed < 2**63:
        raise BadRequest(f"seed must fit in a signed 64-bit integer, got {seed}.", param="seed")
    greedy = temperature < _GREEDY_EPS
    params = SamplingParams(
        n=n,
        max_tokens=max_tokens,
        temperature=temperature,
        # vLLM: zero temperature means greedy sampling, and top-p/top-k/min-p are reset
        top_p=1.0 if greedy else top_p,
        top_k=0 if greedy else max(top_k, 0),
        min_p=0.0 if greedy else min_p,
        presence_penalty=presence,
        frequency_penalty=frequency,
        repetition_penalty=repetition,
        logit_bias=logit_bias,
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


class LogitsAdjuster:
    """Per-choice logits processing before sampling (min_tokens, logit_bias, penalties), in vLLM's order.

    Keeps the output-token counts the penalties need; `observe(token)` after every sampled token. Returns the raw
    logits untouched when nothing applies, so the plain path costs nothing."""

    def __init__(self, params: SamplingParams, prompt_ids: list[int], banned: "torch.Tensor", vocab_width: int) -> None:
        import torch

        self._params = params
        self._banned = banned
        device = banned.device
        self._bias: tuple[torch.Tensor, torch.Tensor] | None = None
        if params.logit_bias:
            ids, values = zip(*params.logit_bias)
            self._bias = (
                torch.tensor(ids, dtype=torch.long, device=device),
                torch.tensor(values, dtype=torch.float32, device=device),
            )
        self._counts: torch.Tensor | None = None
        self._seen: torch.Tensor | None = None  # prompt or output token (repetition penalty)
        if params.penalized:
            self._counts = torch.zeros(vocab_width, dtype=torch.float32, device=device)
            self._seen = torch.zeros(vocab_width, dtype=torch.bool, device=device)
            prompt = torch.tensor([t for t in prompt_ids if t < vocab_width], dtype=torch.long, device=device)
            self._seen[prompt] = True

    def __call__(self, logits: "torch.Tensor", step: int) -> "torch.Tensor":
        import torch

        params = self._params
        if step >= params.min_tokens and self._bias is None and self._counts is None:
            return logits
        scores = logits.float().clone()
        if step < params.min_tokens:
            scores.index_fill_(0, self._banned, float("-inf"))
        if self._bias is not None:
            scores.index_add_(0, self._bias[0], self._bias[1])
        if self._counts is not None and self._seen is not None:
            if params.repetition_penalty != 1.0:
                penalized = torch.where(
                    scores > 0, scores / params.repetition_penalty, scores * params.repetition_penalty
                )
                scores = torch.where(self._seen, penalized, scores)
            scores -= params.frequency_penalty * self._counts
            scores -= params.presence_penalty * (self._counts > 0).float()
        return scores

    def observe(self, token: int) -> None:
        if self._counts is not None and self._seen is not None and token < self._counts.numel():
            self._counts[token] += 1
            self._seen[token] = True


def make_generator(seed: int | None, device: "torch.device") -> "torch.Generator":
    import random

    import torch

    generator = torch.Generator(device=device)
    generator.manual_seed((seed if seed is not None else random.getrandbits(63)) % (2**63))
    return generator


def sample_token(logits: "torch.Tensor", params: SamplingParams, generator: "torch.Generator | None") -> int:
    """Next token from one row of logits [V]: greedy, or temperature → min-p → top-k → top-p → multinomial."""
    import torch

    if params.greedy:
        return int(torch.argmax(logits))
    scores = logits.float() / params.temperature  # [V]
    if params.min_p > 0.0:
        probs = torch.softmax(scores, dim=-1)
        scores = scores.masked_fill(probs < params.min_p * probs.max(), float("-inf"))
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
