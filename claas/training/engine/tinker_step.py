"""One SDPO step on a Tinker training client: teacher scores from the sampler, the custom loss, the optimizer step.

Calls, in order, per batch: `sample(teacher prompt + response, max_tokens=1, topk_prompt_logprobs=K)` on the base
model's sampler for each example (concurrently), `compute_logprobs` of the student sequence on the base model when
`kl_reg_weight > 0`, then per optimizer step `forward_backward_custom(data, loss)` and `optim_step(AdamParams)`,
submitted back to back as the SDK recommends. No saving (the engine does that).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from claas.core.types import TrainingConfig, TrainingExample
from claas.inference.tinker import TinkerSamplers
from claas.training.engine.remote_errors import tinker_errors
from claas.training.engine.tinker_data import response_values, sdpo_datum, teacher_topk
from claas.training.engine.tinker_loss import TopKTailLossConfig, topk_tail_sdpo_loss
from claas.training.examples import ExampleTokens, example_tokens


async def run_sdpo_step(
    client: Any, samplers: TinkerSamplers, examples: list[TrainingExample], cfg: TrainingConfig,
    timing: dict[str, float],
) -> dict[str, float]:
    phase = time.perf_counter()
    tokenizer = await samplers.tokenizer()
    tokens = [example_tokens(tokenizer, example, cfg.feedback_placement) for example in examples]
    timing["tokenize"] = _ms_since(phase)

    phase = time.perf_counter()
    teacher = await samplers.client(None)
    data = await asyncio.gather(*(_datum(teacher, t, cfg) for t in tokens))
    timing["teacher"] = _ms_since(phase)

    loss_config = TopKTailLossConfig(alpha=cfg.alpha, is_clip=cfg.is_clip, kl_reg_weight=cfg.kl_reg_weight)
    collected: list[dict[str, float]] = []

    def sdpo_loss(batch: list[Any], logprobs_list: list[Any]) -> tuple[Any, dict[str, float]]:
        losses, per_example = [], []
        for datum, logprobs in zip(batch, logprobs_list, strict=True):
            inputs = datum.loss_fn_inputs
            loss, metrics = topk_tail_sdpo_loss(
                logprobs,
                inputs["teacher_logprobs"].to_torch(),
                inputs["mask"].to_torch(),
                loss_config,
                rollout_logprobs=inputs["rollout_logprobs"].to_torch() if "rollout_logprobs" in inputs else None,
                base_logprobs=inputs["base_logprobs"].to_torch() if "base_logprobs" in inputs else None,
            )
            losses.append(loss / len(batch))
            per_example.append(metrics)
        total = sum(losses[1:], losses[0])
        summary = {k: sum(m[k] for m in per_example) / len(per_example) for k in per_example[0]}
        summary["tokens"] = sum(m["tokens"] for m in per_example)
        summary["loss"] = float(total.detach())
        collected.append(summary)
        return total, summary

    phase = time.perf_counter()
    for _ in range(cfg.steps):
        with tinker_errors("training step"):
            backward = client.forward_backward_custom(list(data), sdpo_loss)
            optim = client.optim_step(adam_params(cfg))
            await backward
            await optim
    timing["compute"] = _ms_since(phase)
    metrics = dict(collected[-1])
    metrics["loss_mode_teacher_topk_tail"] = 1.0
    return metrics


async def _datum(teacher: Any, tokens: ExampleTokens, cfg: TrainingConfig) -> Any:
    from tinker import types

    sequence = tokens.teacher_prompt_ids + tokens.response_ids
    with tinker_errors("teacher scoring"):
        scored = await teacher.sample(
            prompt=types.ModelInput.from_ints(sequence),
            num_samples=1,
            sampling_params=types.SamplingParams(max_tokens=1, temperature=1.0),
            include_prompt_logprobs=True,
            topk_prompt_logprobs=cfg.teacher_top_k,
        )
    ids, lps = teacher_topk(scored.topk_prompt_logprobs, len(tokens.teacher_prompt_ids), len(tokens.response_ids),
                            cfg.teacher_top_k)
    base = None
    if cfg.kl_reg_weight > 0:
        with tinker_errors("base scoring"):
            sequence = types.ModelInput.from_ints(tokens.prompt_ids + tokens.response_ids)
            per_position = await teacher.compute_logprobs(sequence)
        base = response_values(per_position, len(tokens.prompt_ids), len(tokens.response_ids))
    return sdpo_datum(tokens, ids, lps, base)


def adam_params(cfg: TrainingConfig) -> Any:
    """The local engine's optimizer settings as Tinker's AdamParams (torch AdamW defaults; Tinker's own defaults
    differ: beta2 0.95, eps 1e-12, no clipping)."""
    from tinker import types

    return types.AdamParams(learning_rate=cfg.learning_rate, beta1=0.9, beta2=0.999, eps=1e-8,
                            weight_decay=cfg.weight_decay, grad_clip_norm=cfg.max_grad_norm)


def _ms_since(started: float) -> float:
    return round((time.perf_counter() - started) * 1000.0, 3)
