"""The SDPO loss as Tinker's `forward_backward_custom` sees it: a function of per-token logprobs, no model.

Tinker never exposes logits. What it offers (SDK 0.38) is (a) the teacher's top-K per position from the sampler
(`sample(..., topk_prompt_logprobs=K)`) and (b) differentiable student logprobs of any target ids we name per
position (`target_tokens` of shape [N, K]; `forward_backward_custom` runs our loss on them client-side and sends
-dL/dlogprobs back as cross-entropy weights). So the JSD is computed on a coarsened distribution that both sides
know exactly: the teacher's top-K ids S_t plus one tail bucket holding the rest of the mass,

    p~_t = [p_t(s) for s in S_t] + [1 - sum_s p_t(s)],   q~_t = [q_t(s) for s in S_t] + [1 - sum_s q_t(s)],
    loss = sum_t m_t * w_t * JSD_alpha(p~_t || q~_t) / max(sum_t m_t, 1),
    w_t  = min(exp(log p_t(y_t) - log p_rollout(y_t)), is_clip), detached (1 without rollout logprobs).

Both p_t(s) and q_t(s) are the full-vocabulary probabilities (not renormalized), so the buckets partition the
vocabulary on both sides and JSD(p~ || q~) <= JSD(p || q) (data processing), with equality when the tail is one
token. The local engine's default picks S_t from the *student* (paper appendix A.3); here S_t comes from the
teacher because only the teacher's top-K comes with both sides' exact values in one call. Same `generalized_jsd`
and `append_tail_bucket` as the local loss, so alpha means the same thing.

Column 0 of the student logprobs is the response token y_t itself (for the IS weight and the k3 KL to the base);
columns 1..K are the teacher's ids. Rows where `mask` is 0 (prompt positions) contribute nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from claas.training.sdpo_loss import append_tail_bucket, generalized_jsd, k3_kl

LOG_RATIO_BOUND = 20.0


@dataclass(frozen=True)
class TopKTailLossConfig:
    alpha: float
    is_clip: float
    kl_reg_weight: float = 0.0


def topk_tail_sdpo_loss(
    student_logprobs: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    mask: torch.Tensor,
    config: TopKTailLossConfig,
    *,
    rollout_logprobs: torch.Tensor | None = None,
    base_logprobs: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Token-mean SDPO loss of one response; returns (scalar loss, metrics).

    student_logprobs [N, K+1] (column 0 = the response token), teacher_topk_logprobs [N, K], mask [N] in {0, 1},
    rollout_logprobs / base_logprobs [N] log-probs of the response token (values at masked rows are ignored).
    """
    if student_logprobs.ndim != 2 or teacher_topk_logprobs.shape != (student_logprobs.shape[0],
                                                                       student_logprobs.shape[1] - 1):
        raise ValueError(
            f"student logprobs {tuple(student_logprobs.shape)} must be [N, K+1] for teacher [N, K], "
            f"got teacher {tuple(teacher_topk_logprobs.shape)}"
        )
    keep = mask.to(student_logprobs.dtype)
    tokens = keep.sum()
    token_lp = student_logprobs[:, 0]
    # Masked rows may hold anything; a uniform stand-in keeps exp/log finite there (their weight is 0 anyway).
    uniform = -math.log(student_logprobs.shape[1])
    student_buckets = append_tail_bucket(torch.where(keep[:, None] > 0, student_logprobs[:, 1:], uniform))
    teacher = teacher_topk_logprobs.to(student_logprobs.dtype)
    teacher_buckets = append_tail_bucket(torch.where(keep[:, None] > 0, teacher, uniform))
    jsd = generalized_jsd(student_buckets, teacher_buckets, alpha=config.alpha)  # [N]

    if rollout_logprobs is not None:
        log_ratio = (token_lp.detach() - rollout_logprobs.to(token_lp.dtype)).clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)
        ratio = torch.where(keep > 0, log_ratio.exp(), torch.ones_like(log_ratio))
    else:
        ratio = torch.ones_like(token_lp)
    weight = ratio.clamp(max=config.is_clip).detach()
    per_token = weight * jsd
    kl_reg = torch.zeros((), dtype=student_logprobs.dtype)
    if config.kl_reg_weight > 0 and base_logprobs is not None:
        kl = k3_kl(token_lp, base_logprobs.to(token_lp.dtype))
        kl_reg = (kl * keep).sum() / tokens.clamp(min=1.0)
        per_token = per_token + config.kl_reg_weight * kl
    denominator = tokens.clamp(min=1.0)
    loss = (per_token * keep).sum() / denominator
    count = max(float(tokens), 1.0)
    metrics = {
        "jsd": float((jsd.detach() * keep).sum()) / count,
        "kl_reg": float(kl_reg.detach()),
        "is_ratio_mean": float((ratio * keep).sum()) / count,
        "is_clip_fraction": float(((ratio > config.is_clip).to(keep.dtype) * keep).sum()) / count,
        "student_logprob_mean": float((token_lp.detach() * keep).sum()) / count,
        "tokens": float(tokens),
    }
    return loss, metrics
