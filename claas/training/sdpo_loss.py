"""The SDPO self-distillation loss (Hübotter et al. 2026, arXiv:2601.20802) as pure functions on tensors.

Scope: one response of T tokens at a time. Given the student's logits at the T positions that predict the response
tokens, the teacher's distribution at the same positions (full logits, or top-K log-probs + ids from a remote
teacher), the response ids and mask, and optionally the serving policy's and the frozen base's log-probs of the
response tokens, compute the token-mean SDPO loss and its diagnostics. No model, no I/O, no batching across
responses, no temperature, no double backward (the gradient w.r.t. the logits is computed block by block during the
forward pass; see `sdpo_loss`). `sdpo_loss_from_hidden` is the same loss fused with the lm_head: it takes the final
hidden states and the lm_head weight and forms each block's logits itself, so no [T, V] tensor ever exists.

Conventions, checked against the reference code (lasgroup/SDPO, `verl/trainer/ppo/core_algos.py`,
`compute_self_distillation_loss`) and TRL's `GKDTrainer.generalized_jsd_loss`:

- p = student (gets the gradient), q = teacher (stop-gradient), M = (1 - alpha) * p + alpha * q, and
  JSD_alpha(p, q) = (1 - alpha) * KL(p || M) + alpha * KL(q || M).
- The endpoints are special-cased to the exact KL they approach (up to the factor alpha or 1 - alpha), as the
  reference does: alpha = 0 gives the *forward* KL(q || p) = KL(teacher || student) and alpha = 1 gives the *reverse*
  KL(p || q) = KL(student || teacher) (the reference's config: "0.0=forward KL, 1.0=reverse KL").
- "student_topk" (paper appendix A.3, the reference's `distillation_topk` + `distillation_add_tail`): the K ids are
  chosen by the *student's* log-probs, both sides are gathered at them, and each side gets one tail bucket
  log(1 - sum_k exp(logp_k)), computed as log(-expm1(min(logsumexp(logp_k), -eps))) like the reference (which clamps
  at -1e-7; we clamp at -finfo(dtype).eps, i.e. -1.2e-7 in fp32, so fp64 stays exact for gradcheck).
- The importance weight is min(exp(clamp(logp - logp_rollout, -20, 20)), is_clip), detached, as in the reference
  (the clamp only keeps exp finite; it never binds below is_clip <= e^20).
- Token mean: sum over unmasked tokens divided by max(#unmasked, 1).

Where this differs from the reference: "teacher_topk" (renormalized over a remote teacher's top-K) and the k3 KL to
the base are CLaaS additions; without rollout log-probs the IS weight is 1 (the reference then requires
old_log_probs); the reference's sampled-token mode (`full_logit_distillation=False`) is not provided. Log-probs are
x - (max + log sum exp(x - max)) with torch's cascade sum: at V = 152k in fp32 torch.log_softmax's CPU kernel moves
the loss by ~1e-5 (relative) from its fp64 value, this form by ~1e-7 (benchmarks/bench_loss_memory.py).

Memory: blocks of `chunk_size` positions; the gradient w.r.t. the logits is formed in closed form inside the [T, V]
gradient buffer itself, so beyond that buffer (which any logits-in loss must return) the extra memory is a few
[chunk, K] tensors in the top-K modes and O(chunk * V) in "full" mode or for bf16 / non-contiguous inputs. The fused
entry point needs O(chunk * V) for a block's logits plus the [T, H] gradient of the hidden states, and nothing [T, V].
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F

__all__ = [
    "LossMode",
    "SdpoLossOutput",
    "append_tail_bucket",
    "generalized_jsd",
    "k3_kl",
    "sdpo_loss",
    "sdpo_loss_from_hidden",
]

LossMode = Literal["student_topk", "teacher_topk", "full"]
_MODES: tuple[str, ...] = get_args(LossMode)
_LOG_RATIO_BOUND = 20.0  # the reference clamps log(p / p_rollout) to [-20, 20] before exp


@dataclass(frozen=True)
class SdpoLossOutput:
    loss: torch.Tensor  # scalar, differentiable w.r.t. student_logits (student_hidden for the fused entry point)
    jsd: float  # mean per-token divergence (before IS weighting), unmasked tokens only
    kl_reg: float  # mean k3 KL to the base (0.0 if not computed)
    is_ratio_mean: float  # mean of the unclipped ratio exp(logp - logp_rollout) (1.0 without rollout logprobs)
    is_clip_fraction: float  # fraction of tokens whose ratio exceeded is_clip
    tokens: int  # number of unmasked tokens
    student_logprobs: torch.Tensor  # [T] detached log p_student(response token); 0.0 at masked positions


def generalized_jsd(student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor, *, alpha: float) -> torch.Tensor:
    """Generalized Jensen-Shannon divergence over the last dim: [..., n] log-probs -> [...].

    With p = exp(student_logprobs), q = exp(teacher_logprobs) and M = (1 - alpha) * p + alpha * q:
    (1 - alpha) * KL(p || M) + alpha * KL(q || M). alpha = 0 returns the forward KL(q || p) (teacher || student) and
    alpha = 1 the reverse KL(p || q) (student || teacher), the limits of JSD_alpha / alpha and JSD_alpha / (1 - alpha).
    Inputs must be finite. Note `F.kl_div(input, target)` is KL(target || input): the argument order is swapped
    relative to the maths.
    """
    if alpha == 0.0:
        return F.kl_div(student_logprobs, teacher_logprobs, reduction="none", log_target=True).sum(-1)  # KL(q||p)
    if alpha == 1.0:
        return F.kl_div(teacher_logprobs, student_logprobs, reduction="none", log_target=True).sum(-1)  # KL(p||q)
    # log M = log((1 - alpha) * p + alpha * q), mixed in log space.
    log_mix = torch.logaddexp(student_logprobs + math.log1p(-alpha), teacher_logprobs + math.log(alpha))
    kl_student = F.kl_div(log_mix, student_logprobs, reduction="none", log_target=True).sum(-1)  # KL(p || M)
    kl_teacher = F.kl_div(log_mix, teacher_logprobs, reduction="none", log_target=True).sum(-1)  # KL(q || M)
    return (1.0 - alpha) * kl_student + alpha * kl_teacher


def append_tail_bucket(topk_logprobs: torch.Tensor) -> torch.Tensor:
    """[..., K] log-probs of K of the categories -> [..., K + 1] with the remaining mass as the last bucket.

    tail = log(1 - sum exp(topk)) = log(-expm1(logsumexp(topk))), with logsumexp clamped just below 0 so a top-K that
    (numerically) holds all the mass gives a tiny finite tail instead of log(0).
    """
    ceiling = -torch.finfo(topk_logprobs.dtype).eps
    log_mass = torch.logsumexp(topk_logprobs, dim=-1, keepdim=True).clamp(max=ceiling)  # [..., 1]
    return torch.cat([topk_logprobs, torch.log(-torch.expm1(log_mass))], dim=-1)


def k3_kl(student_logprobs: torch.Tensor, base_logprobs: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(student || base) at sampled tokens: exp(d) - d - 1 with d = base - student.

    Elementwise, >= 0; unbiased for KL(student || base) when the tokens are drawn from the student. d is clamped to
    [-20, 20] only to keep exp finite.
    """
    d = (base_logprobs - student_logprobs).clamp(-_LOG_RATIO_BOUND, _LOG_RATIO_BOUND)
    return torch.exp(d) - d - 1.0


def sdpo_loss(
    *,
    student_logits: torch.Tensor,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
    alpha: float,
    is_clip: float,
    kl_reg_weight: float,
    top_k: int,
    mode: LossMode,
    teacher_logits: torch.Tensor | None = None,
    teacher_topk_logprobs: torch.Tensor | None = None,
    teacher_topk_ids: torch.Tensor | None = None,
    rollout_logprobs: torch.Tensor | None = None,
    base_logprobs: torch.Tensor | None = None,
    chunk_size: int = 256,
) -> SdpoLossOutput:
    """Token-mean SDPO loss: sum_t mask_t * (w_t * JSD_alpha(p_t, q_t) + kl_reg_weight * k3_t) / max(sum mask, 1).

    Args:
        student_logits: [T, V] logits at the positions that predict each response token (any float dtype; the maths
            runs in promote_types(dtype, float32), so bf16 -> fp32 and fp64 stays fp64).
        response_ids: [T] integer ids of the response tokens (values at masked positions are ignored).
        response_mask: [T] bool or 0/1; only unmasked (True) positions enter the loss and get gradient.
        alpha: JSD weight in [0, 1]; 0 = forward KL(teacher || student), 1 = reverse KL(student || teacher).
        is_clip: > 0; the IS weight is min(exp(logp - logp_rollout), is_clip), detached.
        kl_reg_weight: >= 0; weight of the k3 estimate of KL(student || base) at the response tokens.
        top_k: >= 1. "student_topk": K ids with the highest student log-prob (+ tail bucket; K >= V is the full
            vocabulary). "teacher_topk": keep at most K of the teacher's ids. Ignored in "full" mode.
        mode: "student_topk" (default of the service, needs teacher_logits), "teacher_topk" (JSD over the teacher's
            top-K ids, both sides renormalized over those ids with log_softmax, no tail; needs teacher_topk_logprobs
            + teacher_topk_ids, or teacher_logits from which the teacher's top_k is taken) or "full" (whole
            vocabulary, needs teacher_logits).
        teacher_logits: [T, V] full teacher logits (stop-gradient).
        teacher_topk_logprobs: [T, K'] teacher log-probs at teacher_topk_ids (finite; any normalization).
        teacher_topk_ids: [T, K'] distinct ids in [0, V) per row.
        rollout_logprobs: [T] log-prob of each response token under the serving policy; None -> weight 1.
        base_logprobs: [T] log-prob of each response token under the frozen base; required if kl_reg_weight > 0.
        chunk_size: unmasked positions per block; peak extra memory is O(chunk_size * V) plus the [T, V] gradient.

    The loss is computed in blocks of positions. When a gradient is wanted it is formed block by block during this
    call, in closed form, directly in one [T, V] buffer that backward hands on (the loss is a sum of per-position
    terms, so this is exact): with lp = x - logsumexp(x) and g = dloss/dlp at the few gathered entries,
    dloss/dx = scatter(g) - sum(g) * softmax(x), and softmax(x) is built in place in the buffer's rows. Autograd
    only sees the gathered student log-probs ([n, K] in the top-K modes, [n, V] in "full"), never a [T, V] tensor.
    Backward may run again with retain_graph=True; double backward (create_graph=True) is not supported.
    To avoid the [T, V] logits and their [T, V] gradient altogether, use `sdpo_loss_from_hidden`.
    """
    _validate_settings(alpha=alpha, is_clip=is_clip, kl_reg_weight=kl_reg_weight, top_k=top_k, mode=mode,
                       chunk_size=chunk_size)
    if student_logits.dim() != 2 or not student_logits.is_floating_point():
        raise ValueError(f"student_logits must be a float [T, V] tensor, got {student_logits.dtype} "
                         f"{tuple(student_logits.shape)}")
    num_positions, vocab = student_logits.shape
    if vocab < 1:
        raise ValueError("student_logits has an empty vocabulary dimension")
    if teacher_logits is not None and tuple(teacher_logits.shape) != (num_positions, vocab):
        raise ValueError(f"teacher_logits must have the shape of student_logits {(num_positions, vocab)}, "
                         f"got {tuple(teacher_logits.shape)}")
    _validate_side_inputs(
        num_positions=num_positions,
        vocab=vocab,
        teacher_full=teacher_logits,
        teacher_name="teacher_logits",
        response_ids=response_ids,
        response_mask=response_mask,
        kl_reg_weight=kl_reg_weight,
        mode=mode,
        teacher_topk_logprobs=teacher_topk_logprobs,
        teacher_topk_ids=teacher_topk_ids,
        rollout_logprobs=rollout_logprobs,
        base_logprobs=base_logprobs,
    )
    cdtype = torch.promote_types(student_logits.dtype, torch.float32)
    need_grad = torch.is_grad_enabled() and student_logits.requires_grad
    grad_logits = torch.zeros_like(student_logits, memory_format=torch.contiguous_format) if need_grad else None
    run = _LossRun(
        response_ids=response_ids,
        response_mask=response_mask,
        alpha=alpha,
        is_clip=is_clip,
        kl_reg_weight=kl_reg_weight,
        top_k=top_k,
        mode=mode,
        teacher_topk_logprobs=teacher_topk_logprobs,
        teacher_topk_ids=teacher_topk_ids,
        rollout_logprobs=rollout_logprobs,
        base_logprobs=base_logprobs,
        num_positions=num_positions,
        cdtype=cdtype,
        device=student_logits.device,
        need_grad=need_grad,
    )
    for block in run.blocks(chunk_size):
        with torch.no_grad():
            x = block.take(student_logits).detach()  # [n, V] a view when the block is a contiguous run
            scratch, scratch_is_grad = block.scratch(grad_logits, x, cdtype)  # [n, V] the gradient's rows if possible
        run.add_block(block, x, scratch, teacher_logits=block.take(teacher_logits))
        if grad_logits is not None and not scratch_is_grad:
            with torch.no_grad():
                block.put(grad_logits, scratch)
    return run.output(student_logits, grad_logits)


def sdpo_loss_from_hidden(
    *,
    student_hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
    alpha: float,
    is_clip: float,
    kl_reg_weight: float,
    top_k: int,
    mode: LossMode,
    teacher_hidden: torch.Tensor | None = None,
    teacher_topk_logprobs: torch.Tensor | None = None,
    teacher_topk_ids: torch.Tensor | None = None,
    rollout_logprobs: torch.Tensor | None = None,
    base_logprobs: torch.Tensor | None = None,
    lm_head_bias: torch.Tensor | None = None,
    logit_scale: float = 1.0,
    chunk_size: int = 256,
) -> SdpoLossOutput:
    """`sdpo_loss` fused with the lm_head: takes final hidden states and never builds the [T, V] logits.

    Equal to `sdpo_loss(student_logits=z(student_hidden), teacher_logits=z(teacher_hidden), ...)` with
    z(h) = (h @ lm_head_weight.T + lm_head_bias).to(promote_types(h.dtype, float32)) * logit_scale: the product runs
    in the hidden states' dtype (as the model's own lm_head does) and each block's logits are cast up, like
    `model(...).logits.float()`. The loss backpropagates into student_hidden only.

    Args:
        student_hidden: [T, H] final-norm hidden states at the positions that predict each response token (the
            input of the model's lm_head), usually requiring grad.
        lm_head_weight: [V, H] the lm_head (output embedding) weight, same dtype and device as student_hidden.
            Frozen: no gradient is returned for it, so it must not require grad while grad is enabled (pass
            `.detach()`; to train the lm_head use `sdpo_loss` on materialized logits).
        teacher_hidden: [T, H] the teacher's final hidden states under the same lm_head (self-teacher); its logits are
            formed block by block, with no gradient. Plays the role of `teacher_logits` in every mode.
        lm_head_bias: [V] optional bias of the lm_head (frozen, like the weight).
        logit_scale: > 0; multiplies the logits (1.0 for Llama / Qwen).
        chunk_size: unmasked positions per block; peak extra memory is O(chunk_size * V) for the block's logits plus
            the [T, H] gradient of the hidden states.
        Everything else: as in `sdpo_loss` (V = lm_head_weight.shape[0]).

    Per block of n positions: the student's and the teacher's [n, V] logits, the block's loss terms and the closed-form
    gradient w.r.t. the logits exactly as in `sdpo_loss` (same code), then dloss/dh = (dloss/dlogits * logit_scale)
    @ lm_head_weight (in the weight's dtype, as autograd through the lm_head would do) into the [T, H] gradient.
    """
    _validate_settings(alpha=alpha, is_clip=is_clip, kl_reg_weight=kl_reg_weight, top_k=top_k, mode=mode,
                       chunk_size=chunk_size)
    _validate_hidden(student_hidden=student_hidden, lm_head_weight=lm_head_weight, teacher_hidden=teacher_hidden,
                     lm_head_bias=lm_head_bias, logit_scale=logit_scale)
    num_positions, vocab = student_hidden.shape[0], lm_head_weight.shape[0]
    _validate_side_inputs(
        num_positions=num_positions,
        vocab=vocab,
        teacher_full=teacher_hidden,
        teacher_name="teacher_hidden",
        response_ids=response_ids,
        response_mask=response_mask,
        kl_reg_weight=kl_reg_weight,
        mode=mode,
        teacher_topk_logprobs=teacher_topk_logprobs,
        teacher_topk_ids=teacher_topk_ids,
        rollout_logprobs=rollout_logprobs,
        base_logprobs=base_logprobs,
    )
    cdtype = torch.promote_types(student_hidden.dtype, torch.float32)
    need_grad = torch.is_grad_enabled() and student_hidden.requires_grad
    grad_hidden = torch.zeros_like(student_hidden, memory_format=torch.contiguous_format) if need_grad else None
    weight = lm_head_weight.detach()  # [V, H]
    bias = None if lm_head_bias is None else lm_head_bias.detach()  # [V]

    def block_logits(hidden_rows: torch.Tensor) -> torch.Tensor:
        """[n, H] -> [n, V] logits, fresh. Left in the lm_head's dtype when unscaled: the block maths casts what it
        reads to cdtype exactly as a cast of the whole block would (bf16 -> fp32 is exact), at half the memory."""
        with torch.no_grad():
            logits = F.linear(hidden_rows.detach(), weight, bias)
            if logit_scale != 1.0:
                logits = logits.to(cdtype).mul_(logit_scale)
        return logits

    run = _LossRun(
        response_ids=response_ids,
        response_mask=response_mask,
        alpha=alpha,
        is_clip=is_clip,
        kl_reg_weight=kl_reg_weight,
        top_k=top_k,
        mode=mode,
        teacher_topk_logprobs=teacher_topk_logprobs,
        teacher_topk_ids=teacher_topk_ids,
        rollout_logprobs=rollout_logprobs,
        base_logprobs=base_logprobs,
        num_positions=num_positions,
        cdtype=cdtype,
        device=student_hidden.device,
        need_grad=need_grad,
    )
    for block in run.blocks(chunk_size):
        x = block_logits(block.take(student_hidden))  # [n, V]
        teacher_rows = None if teacher_hidden is None else block_logits(block.take(teacher_hidden))  # [n, V]
        if teacher_rows is not None and teacher_rows.dtype == cdtype:
            scratch = teacher_rows  # ours and read before it is written: one [n, V] buffer fewer
        else:
            scratch = torch.empty(x.shape, dtype=cdtype, device=x.device)  # [n, V] ends up holding dloss/dx
        run.add_block(block, x, scratch, teacher_logits=teacher_rows)
        del x, teacher_rows  # free the block's logits before the gradient product
        if grad_hidden is not None:
            with torch.no_grad():
                if logit_scale != 1.0:
                    scratch.mul_(logit_scale)
                block.put(grad_hidden, scratch.to(weight.dtype) @ weight)  # [n, H]
        del scratch
    return run.output(student_hidden, grad_hidden)


class _LossRun:
    """One evaluation of the loss, shared by both entry points: the settings, the per-position side inputs, the
    unmasked positions and the running sums. `add_block` holds all the maths of a block of positions; the entry points
    only differ in where a block's logits come from and where its gradient goes."""

    def __init__(
        self,
        *,
        response_ids: torch.Tensor,
        response_mask: torch.Tensor,
        alpha: float,
        is_clip: float,
        kl_reg_weight: float,
        top_k: int,
        mode: LossMode,
        teacher_topk_logprobs: torch.Tensor | None,
        teacher_topk_ids: torch.Tensor | None,
        rollout_logprobs: torch.Tensor | None,
        base_logprobs: torch.Tensor | None,
        num_positions: int,
        cdtype: torch.dtype,
        device: torch.device,
        need_grad: bool,
    ) -> None:
        self.response_ids = response_ids
        self.alpha, self.is_clip, self.kl_reg_weight = alpha, is_clip, kl_reg_weight
        self.top_k, self.mode = top_k, mode
        self.teacher_topk_logprobs, self.teacher_topk_ids = teacher_topk_logprobs, teacher_topk_ids
        self.rollout_logprobs, self.base_logprobs = rollout_logprobs, base_logprobs
        self.cdtype, self.need_grad = cdtype, need_grad
        mask = response_mask.to(device=device, dtype=torch.bool)  # [T]
        self.positions = mask.nonzero().squeeze(1)  # [N] unmasked positions
        self.num_tokens = int(self.positions.numel())
        self.denominator = float(max(self.num_tokens, 1))
        self.loss_sum = torch.zeros((), dtype=cdtype, device=device)
        self.jsd_sum = torch.zeros((), dtype=cdtype, device=device)
        self.k3_sum = torch.zeros((), dtype=cdtype, device=device)
        self.ratio_sum = torch.zeros((), dtype=cdtype, device=device)
        self.clipped = torch.zeros((), dtype=torch.long, device=device)
        self.token_logprobs = torch.zeros(num_positions, dtype=cdtype, device=device)  # [T]

    def blocks(self, chunk_size: int) -> Iterator[_Block]:
        for start in range(0, self.num_tokens, chunk_size):
            yield _Block(self.positions[start : start + chunk_size])

    def add_block(
        self, block: _Block, x: torch.Tensor, scratch: torch.Tensor, *, teacher_logits: torch.Tensor | None
    ) -> None:
        """Add one block's terms, given its student logits x [n, V] and the teacher's logits [n, V] (or None).

        scratch: [n, V] in cdtype, not aliasing x (it may be the teacher's rows, see `_gather_block`); when a gradient
        is wanted it is left holding dloss/dx.
        """
        with torch.no_grad():
            gathered = _gather_block(
                x.detach(),
                scratch,
                block.take(self.response_ids),
                mode=self.mode,
                top_k=self.top_k,
                teacher_logits=teacher_logits,
                teacher_topk_logprobs=block.take(self.teacher_topk_logprobs),
                teacher_topk_ids=block.take(self.teacher_topk_ids),
            )
        # Autograd from here on sees only the gathered [n, S] student log-probs and the [n] token log-probs.
        with torch.enable_grad() if self.need_grad else torch.no_grad():
            student = gathered.student.requires_grad_(self.need_grad)  # [n, S]
            logp = gathered.token_logp.requires_grad_(self.need_grad)  # [n]
            jsd = generalized_jsd(gathered.student_dist(student), gathered.teacher, alpha=self.alpha)  # [n]
            if self.rollout_logprobs is None:
                weight = torch.ones_like(jsd)  # [n]
            else:
                log_ratio = logp.detach() - block.take(self.rollout_logprobs).to(self.cdtype)
                ratio = torch.exp(log_ratio.clamp(-_LOG_RATIO_BOUND, _LOG_RATIO_BOUND))  # [n]
                weight = ratio.clamp(max=self.is_clip)  # detached: logp.detach() above
                self.ratio_sum += ratio.sum()
                self.clipped += (ratio > self.is_clip).sum()
            per_token = weight * jsd  # [n]
            if self.kl_reg_weight > 0:
                k3 = k3_kl(logp, block.take(self.base_logprobs).to(self.cdtype))  # [n]
                per_token = per_token + self.kl_reg_weight * k3
                self.k3_sum += k3.detach().sum()
            block_loss = per_token.sum() / self.denominator
        if self.need_grad:
            g_student, g_token = torch.autograd.grad(
                block_loss, (student, logp), allow_unused=True, materialize_grads=True
            )  # [n, S], [n]
            with torch.no_grad():
                gathered.write_logit_grad(scratch, g_student, g_token)
        self.loss_sum += block_loss.detach()
        self.jsd_sum += jsd.detach().sum()
        block.put(self.token_logprobs, logp.detach())

    def output(self, source: torch.Tensor, grad: torch.Tensor | None) -> SdpoLossOutput:
        """The result; with `grad` (dloss/dsource, already complete) the loss backpropagates into `source`."""
        loss = self.loss_sum if grad is None else _LossWithBlockGrad.apply(source, self.loss_sum, grad)
        num_tokens, denominator = self.num_tokens, self.denominator
        has_rollout = self.rollout_logprobs is not None and num_tokens > 0
        return SdpoLossOutput(
            loss=loss,
            jsd=self.jsd_sum.item() / denominator,
            kl_reg=self.k3_sum.item() / denominator,
            is_ratio_mean=self.ratio_sum.item() / num_tokens if has_rollout else 1.0,
            is_clip_fraction=self.clipped.item() / num_tokens if has_rollout else 0.0,
            tokens=num_tokens,
            student_logprobs=self.token_logprobs,
        )


@dataclass
class _Gathered:
    """One block's student/teacher log-probs on the support the divergence is taken over.

    student: [n, S] log p at `ids` (all V ids when ids is None), detached; the divergence's input.
    teacher: [n, S'] the teacher's distribution over the categories (S' = S + 1 with a tail bucket).
    token_logp: [n] log p(response token).
    softmax_scale: [n, 1] 1 / sum(exp(x - max)); the scratch holds exp(x - max), so scratch * scale = softmax(x).
    """

    student: torch.Tensor
    teacher: torch.Tensor
    token_logp: torch.Tensor
    ids: torch.Tensor | None
    token_ids: torch.Tensor
    softmax_scale: torch.Tensor
    tail: bool
    renormalize: bool

    def student_dist(self, student: torch.Tensor) -> torch.Tensor:
        """The student's distribution over the same categories as `teacher`, differentiable in `student`."""
        if self.tail:
            return append_tail_bucket(student)  # [n, K + 1]
        if self.renormalize:
            return torch.log_softmax(student, dim=-1)  # [n, K]
        return student  # [n, V]

    def write_logit_grad(self, scratch: torch.Tensor, g_student: torch.Tensor, g_token: torch.Tensor) -> None:
        """scratch <- dloss/dx = scatter(g) - sum(g) * softmax(x), for lp = x - logsumexp(x) gathered at ids."""
        total = g_student.sum(-1, keepdim=True) + g_token.unsqueeze(-1)  # [n, 1]
        scratch.mul_(-total * self.softmax_scale)  # [n, V]
        if self.ids is None:
            scratch.add_(g_student)
        else:
            scratch.scatter_add_(-1, self.ids, g_student)
        scratch.scatter_add_(-1, self.token_ids, g_token.unsqueeze(-1))


def _log_normalizer(z: torch.Tensor, scratch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise (logsumexp(z), 1 / sum(exp(z - max))), both [n, 1]; leaves exp(z - max) in scratch [n, V].

    The max-shifted sum uses torch's pairwise/cascade reduction; at V = 152k in fp32 this is ~100x closer to the
    fp64 value than torch.log_softmax's CPU kernel (measured: 6e-8 vs 8e-6 relative on the loss).
    """
    shift = z.amax(dim=-1, keepdim=True).to(scratch.dtype)  # [n, 1]
    if z.dtype == scratch.dtype:
        torch.sub(z, shift, out=scratch).exp_()  # [n, V]
    else:  # sub(bf16, fp32, out=fp32) would allocate an [n, V] fp32 temporary; the exact upcast in place does not
        scratch.copy_(z).sub_(shift).exp_()  # [n, V]
    total = scratch.sum(dim=-1, keepdim=True)  # [n, 1]
    return shift + total.log(), total.reciprocal()


def _gather_block(
    x: torch.Tensor,
    scratch: torch.Tensor,
    ids: torch.Tensor,
    *,
    mode: LossMode,
    top_k: int,
    teacher_logits: torch.Tensor | None,
    teacher_topk_logprobs: torch.Tensor | None,
    teacher_topk_ids: torch.Tensor | None,
) -> _Gathered:
    """Gather what the divergence needs from one block of student logits x [n, V] (and the teacher's rows).

    scratch: an [n, V] work buffer in the compute dtype, left holding exp(x - max). It must not alias x; it may be the
    teacher_logits rows themselves when the caller gives them up (same dtype): every read of teacher_logits happens
    before the first write to scratch.
    """
    cdtype = scratch.dtype
    vocab = x.shape[-1]
    token_ids = ids.long().unsqueeze(-1)  # [n, 1]
    support: torch.Tensor | None
    tail = renormalize = False
    if mode == "full" or (mode == "student_topk" and top_k >= vocab):
        support = None
        teacher = _given(teacher_logits).to(cdtype, copy=True)  # [n, V] a copy: scratch may be the teacher's rows
        teacher -= _log_normalizer(teacher, scratch)[0]  # [n, V]
    elif mode == "student_topk":
        support = torch.topk(x, top_k, dim=-1, sorted=False).indices  # [n, K], chosen by the student
        teacher_rows = _given(teacher_logits)
        teacher_at_support = teacher_rows.gather(-1, support).to(cdtype)  # [n, K] read before scratch is written
        teacher_log_z = _log_normalizer(teacher_rows, scratch)[0]  # [n, 1]
        teacher = append_tail_bucket(teacher_at_support - teacher_log_z)  # [n, K + 1]
        tail = True
    elif mode == "teacher_topk":
        if teacher_topk_ids is None:  # full teacher logits given: take the teacher's own top-K
            top = torch.topk(_given(teacher_logits), min(top_k, vocab), dim=-1, sorted=False)
            values, support = top.values.to(cdtype), top.indices  # [n, K]
        else:
            values, support = _given(teacher_topk_logprobs).to(cdtype), teacher_topk_ids.long()  # [n, K']
            if support.shape[-1] > top_k:
                keep = torch.topk(values, top_k, dim=-1, sorted=False).indices  # [n, K]
                values, support = values.gather(-1, keep), support.gather(-1, keep)
        # Both sides renormalized over the teacher's ids; no tail (a remote teacher reports no tail mass).
        teacher = torch.log_softmax(values, dim=-1)  # [n, K]
        renormalize = True
    else:  # unreachable after _validate; kept so a new mode cannot fall through silently
        raise ValueError(f"unknown loss mode {mode!r}; expected one of {_MODES}")

    # The student last, so the scratch ends up holding its exp(x - max) for the gradient.
    log_z, softmax_scale = _log_normalizer(x, scratch)  # [n, 1], [n, 1]
    student = (x.to(cdtype) if support is None else x.gather(-1, support).to(cdtype)) - log_z  # [n, S]
    token_logp = (x.gather(-1, token_ids).to(cdtype) - log_z).squeeze(-1)  # [n]
    return _Gathered(
        student=student,
        teacher=teacher,
        token_logp=token_logp,
        ids=support,
        token_ids=token_ids,
        softmax_scale=softmax_scale,
        tail=tail,
        renormalize=renormalize,
    )


class _Block:
    """The unmasked positions handled in one block; a contiguous run is taken as a view, not a [n, V] copy."""

    def __init__(self, rows: torch.Tensor) -> None:
        self.rows = rows  # [n]
        self.first, self.count = int(rows[0]), int(rows.numel())
        self.contiguous = int(rows[-1]) - self.first + 1 == self.count

    def take(self, x: torch.Tensor | None) -> Any:
        if x is None:
            return None
        return x.narrow(0, self.first, self.count) if self.contiguous else x.index_select(0, self.rows)

    def put(self, out: torch.Tensor, values: torch.Tensor) -> None:
        if self.contiguous:
            out.narrow(0, self.first, self.count).copy_(values)
        else:
            out.index_copy_(0, self.rows, values.to(out.dtype))

    def scratch(
        self, grad_logits: torch.Tensor | None, x: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, bool]:
        """A [n, V] work buffer and whether it is the gradient's own rows (used when they can hold `dtype`)."""
        if grad_logits is not None and self.contiguous and grad_logits.dtype == dtype:
            return grad_logits.narrow(0, self.first, self.count), True
        return torch.empty(x.shape, dtype=dtype, device=x.device), False


def _given(x: torch.Tensor | None) -> torch.Tensor:
    if x is None:  # _validate rules this out; this only narrows the type
        raise ValueError("internal error: a teacher input that _validate required is missing")
    return x


class _LossWithBlockGrad(torch.autograd.Function):
    """Attach the gradient w.r.t. the input (logits or hidden states), already computed block by block, to the loss."""

    @staticmethod
    def forward(ctx: Any, source: torch.Tensor, loss: torch.Tensor, grad_source: torch.Tensor) -> torch.Tensor:
        del source  # an input only so autograd routes the gradient to it
        # Saved (not set on ctx) so autograd frees it right after backward unless retain_graph=True: the leaf's .grad
        # can then take the buffer over instead of copying it.
        ctx.save_for_backward(grad_source)
        return loss.clone()

    @staticmethod
    def backward(ctx: Any, *grad_outputs: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (grad_output,) = grad_outputs  # [] scalar
        (grad_source,) = ctx.saved_tensors  # [T, V] or [T, H]
        if not bool(grad_output == 1):  # the usual loss.backward() needs no full-size product
            grad_source = grad_source * grad_output.to(grad_source.dtype)
        return grad_source, None, None


def _validate_settings(
    *, alpha: float, is_clip: float, kl_reg_weight: float, top_k: int, mode: str, chunk_size: int
) -> None:
    if mode not in _MODES:
        raise ValueError(f"unknown loss mode {mode!r}; expected one of {_MODES}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if not is_clip > 0:
        raise ValueError(f"is_clip must be > 0, got {is_clip}")
    if not kl_reg_weight >= 0 or math.isinf(kl_reg_weight):
        raise ValueError(f"kl_reg_weight must be a finite number >= 0, got {kl_reg_weight}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be an int >= 1, got {top_k!r}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")


def _validate_hidden(
    *,
    student_hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    teacher_hidden: torch.Tensor | None,
    lm_head_bias: torch.Tensor | None,
    logit_scale: float,
) -> None:
    if student_hidden.dim() != 2 or not student_hidden.is_floating_point():
        raise ValueError(f"student_hidden must be a float [T, H] tensor, got {student_hidden.dtype} "
                         f"{tuple(student_hidden.shape)}")
    if lm_head_weight.dim() != 2 or not lm_head_weight.is_floating_point():
        raise ValueError(f"lm_head_weight must be a float [V, H] tensor, got {lm_head_weight.dtype} "
                         f"{tuple(lm_head_weight.shape)}")
    vocab, hidden = lm_head_weight.shape
    if hidden != student_hidden.shape[1]:
        raise ValueError(f"lm_head_weight [V, H] = {tuple(lm_head_weight.shape)} does not match the hidden size "
                         f"H = {student_hidden.shape[1]} of student_hidden {tuple(student_hidden.shape)}")
    if vocab < 1:
        raise ValueError("lm_head_weight has an empty vocabulary dimension")
    if teacher_hidden is not None and teacher_hidden.shape != student_hidden.shape:
        raise ValueError(f"teacher_hidden must have the shape of student_hidden {tuple(student_hidden.shape)}, "
                         f"got {tuple(teacher_hidden.shape)}")
    if lm_head_bias is not None and tuple(lm_head_bias.shape) != (vocab,):
        raise ValueError(f"lm_head_bias must have shape [V] = ({vocab},), got {tuple(lm_head_bias.shape)}")
    for name, other in (("lm_head_weight", lm_head_weight), ("teacher_hidden", teacher_hidden),
                        ("lm_head_bias", lm_head_bias)):
        if other is None:
            continue
        if other.dtype != student_hidden.dtype:
            raise ValueError(f"{name} is {other.dtype} but student_hidden is {student_hidden.dtype}; the lm_head "
                             f"product runs in one dtype (cast the hidden states to the lm_head's dtype)")
        if other.device != student_hidden.device:
            raise ValueError(f"{name} is on {other.device} but student_hidden is on {student_hidden.device}")
    if torch.is_grad_enabled():
        for name, param in (("lm_head_weight", lm_head_weight), ("lm_head_bias", lm_head_bias)):
            if param is not None and param.requires_grad:
                raise ValueError(f"{name} requires grad, but sdpo_loss_from_hidden returns a gradient only for "
                                 f"student_hidden (the lm_head is frozen in LoRA training): pass {name}.detach(), or "
                                 f"use sdpo_loss on materialized logits to train the lm_head")
    if isinstance(logit_scale, bool) or not math.isfinite(logit_scale) or not logit_scale > 0:
        raise ValueError(f"logit_scale must be a finite number > 0, got {logit_scale!r}")


def _validate_side_inputs(
    *,
    num_positions: int,
    vocab: int,
    teacher_full: torch.Tensor | None,
    teacher_name: str,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
    kl_reg_weight: float,
    mode: str,
    teacher_topk_logprobs: torch.Tensor | None,
    teacher_topk_ids: torch.Tensor | None,
    rollout_logprobs: torch.Tensor | None,
    base_logprobs: torch.Tensor | None,
) -> None:
    """Everything but the student's (and full teacher's) own tensors, which the entry points check."""

    def check_vector(name: str, x: torch.Tensor | None) -> None:
        if x is not None and tuple(x.shape) != (num_positions,):
            raise ValueError(f"{name} must have shape [T] = ({num_positions},), got {tuple(x.shape)}")

    check_vector("response_ids", response_ids)
    check_vector("response_mask", response_mask)
    check_vector("rollout_logprobs", rollout_logprobs)
    check_vector("base_logprobs", base_logprobs)
    if response_ids.is_floating_point() or response_ids.is_complex():
        raise ValueError(f"response_ids must be an integer tensor, got {response_ids.dtype}")
    if response_mask.dtype != torch.bool and not bool(((response_mask == 0) | (response_mask == 1)).all()):
        raise ValueError("response_mask must be bool or hold only 0/1")
    mask = response_mask.to(device=response_ids.device, dtype=torch.bool)
    if bool(((response_ids < 0) | (response_ids >= vocab))[mask].any()):
        raise ValueError(f"response_ids at unmasked positions must be in [0, V) = [0, {vocab})")
    if kl_reg_weight > 0 and base_logprobs is None:
        raise ValueError("base_logprobs is required when kl_reg_weight > 0 (the k3 KL to the base needs it)")

    has_topk = teacher_topk_logprobs is not None or teacher_topk_ids is not None
    if mode in ("student_topk", "full"):
        if teacher_full is None:
            raise ValueError(f"mode {mode!r} needs {teacher_name} (the full teacher distribution)")
        if has_topk:
            raise ValueError(f"mode {mode!r} uses {teacher_name}; teacher_topk_logprobs/ids must be None")
    else:  # teacher_topk
        if teacher_full is not None and has_topk:
            raise ValueError(f"mode 'teacher_topk' takes either {teacher_name} or teacher_topk_logprobs/ids, not both")
        if teacher_full is None and (teacher_topk_logprobs is None or teacher_topk_ids is None):
            raise ValueError(f"mode 'teacher_topk' needs teacher_topk_logprobs and teacher_topk_ids "
                             f"(or {teacher_name})")
    if teacher_topk_logprobs is not None and teacher_topk_ids is not None:
        shape = tuple(teacher_topk_ids.shape)
        if len(shape) != 2 or shape[0] != num_positions or shape[1] < 1:
            raise ValueError(f"teacher_topk_ids must have shape [T, K] with T = {num_positions}, K >= 1, got {shape}")
        if tuple(teacher_topk_logprobs.shape) != shape:
            raise ValueError(f"teacher_topk_logprobs must have the shape of teacher_topk_ids {shape}, "
                             f"got {tuple(teacher_topk_logprobs.shape)}")
        if teacher_topk_ids.is_floating_point() or teacher_topk_ids.is_complex():
            raise ValueError(f"teacher_topk_ids must be an integer tensor, got {teacher_topk_ids.dtype}")
        if bool(((teacher_topk_ids < 0) | (teacher_topk_ids >= vocab)).any()):
            raise ValueError(f"teacher_topk_ids must be in [0, V) = [0, {vocab})")
        ordered = teacher_topk_ids.sort(dim=-1).values
        if bool((ordered[:, 1:] == ordered[:, :-1]).any()):
            raise ValueError("teacher_topk_ids must not repeat an id within a position")
        if not bool(torch.isfinite(teacher_topk_logprobs).all()):
            raise ValueError("teacher_topk_logprobs must be finite (drop missing entries instead of padding with -inf)")
