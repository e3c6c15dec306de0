"""Properties of the SDPO loss on tiny seeded tensors (fp64 unless a test is about dtypes).

The slow reference below loops over tokens with plain probabilities (softmax, p * log(p / m), 1 - sum for the tail),
so it shares no code and no log-space tricks with `claas.training.sdpo_loss`.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from claas.training.sdpo_loss import generalized_jsd, sdpo_loss, sdpo_loss_from_hidden

MODES = ("student_topk", "teacher_topk", "full")
ALPHAS = (0.0, 0.1, 0.5, 0.9, 1.0)
F64 = torch.float64


# ----------------------------------------------------------------------------------------------- slow reference
def _kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """KL(a || b) = sum_i a_i log(a_i / b_i) over probability vectors, with 0 log 0 = 0."""
    keep = a > 0
    return (a[keep] * torch.log(a[keep] / b[keep])).sum()


def _ref_jsd(p: torch.Tensor, q: torch.Tensor, alpha: float) -> torch.Tensor:
    if alpha == 0.0:
        return _kl(q, p)  # forward KL(teacher || student)
    if alpha == 1.0:
        return _kl(p, q)  # reverse KL(student || teacher)
    m = (1 - alpha) * p + alpha * q
    return (1 - alpha) * _kl(p, m) + alpha * _kl(q, m)


def reference_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    response_ids: torch.Tensor,
    mask: list[bool],
    *,
    mode: str,
    alpha: float,
    top_k: int,
    is_clip: float,
    kl_reg_weight: float,
    rollout: torch.Tensor | None = None,
    base: torch.Tensor | None = None,
    teacher_topk_logprobs: torch.Tensor | None = None,
    teacher_topk_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, float]:
    """(loss, mean jsd), one token at a time."""
    num_positions, vocab = student_logits.shape
    total = student_logits.new_zeros(())
    jsd_total = 0.0
    count = 0
    for t in range(num_positions):
        if not mask[t]:
            continue
        count += 1
        p = torch.softmax(student_logits[t], dim=0)
        if mode == "teacher_topk":
            assert teacher_topk_logprobs is not None and teacher_topk_ids is not None
            ids = teacher_topk_ids[t].tolist()
            weights = teacher_topk_logprobs[t].exp().tolist()
            chosen = sorted(range(len(ids)), key=lambda i: -weights[i])[:top_k]
            ids = [ids[i] for i in chosen]
            q_top = torch.tensor([weights[i] for i in chosen], dtype=F64)
            big_p, big_q = p[ids] / p[ids].sum(), q_top / q_top.sum()
        else:
            assert teacher_logits is not None
            q = torch.softmax(teacher_logits[t], dim=0).detach()
            if mode == "full" or top_k >= vocab:
                big_p, big_q = p, q
            else:
                order = sorted(range(vocab), key=lambda j: -p[j].item())[:top_k]
                big_p = torch.cat([p[order], (1 - p[order].sum()).clamp(min=0).reshape(1)])
                big_q = torch.cat([q[order], (1 - q[order].sum()).clamp(min=0).reshape(1)])
        jsd = _ref_jsd(big_p, big_q, alpha)
        jsd_total += jsd.item()
        logp = torch.log(p[int(response_ids[t])])
        weight = 1.0 if rollout is None else min(math.exp(logp.item() - rollout[t].item()), is_clip)
        term = weight * jsd
        if kl_reg_weight > 0:
            assert base is not None
            d = base[t] - logp
            term = term + kl_reg_weight * (torch.exp(d) - d - 1)
        total = total + term
    return total / max(count, 1), jsd_total / max(count, 1)


# ----------------------------------------------------------------------------------------------- helpers
def _inputs(seed: int, num_positions: int, vocab: int, *, scale: float = 2.0, k_teacher: int = 4) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(seed)
    student = (scale * torch.randn(num_positions, vocab, generator=gen, dtype=F64)).requires_grad_(True)
    teacher = scale * torch.randn(num_positions, vocab, generator=gen, dtype=F64)
    ids = torch.randint(0, vocab, (num_positions,), generator=gen)
    k_teacher = min(k_teacher, vocab)
    topk_ids = torch.stack([torch.randperm(vocab, generator=gen)[:k_teacher] for _ in range(num_positions)])
    topk_logprobs = torch.log_softmax(teacher, -1).gather(-1, topk_ids)
    rollout = torch.log_softmax(student.detach(), -1).gather(-1, ids[:, None]).squeeze(-1)
    rollout = rollout + torch.randn(num_positions, generator=gen, dtype=F64)
    base = rollout + 0.5 * torch.randn(num_positions, generator=gen, dtype=F64)
    return {
        "student": student, "teacher": teacher, "ids": ids, "topk_ids": topk_ids, "topk_logprobs": topk_logprobs,
        "rollout": rollout, "base": base,
    }


def _call(data: dict[str, Any], mode: str, **overrides: Any) -> Any:
    """sdpo_loss on `data` with the right teacher inputs for `mode`; overrides win."""
    num_positions = data["student"].shape[0]
    kwargs: dict[str, Any] = {
        "student_logits": data["student"],
        "response_ids": data["ids"],
        "response_mask": torch.ones(num_positions, dtype=torch.bool),
        "alpha": 0.5,
        "is_clip": 2.0,
        "kl_reg_weight": 0.0,
        "top_k": 3,
        "mode": mode,
    }
    if mode == "teacher_topk":
        kwargs.update(teacher_topk_logprobs=data["topk_logprobs"], teacher_topk_ids=data["topk_ids"])
    else:
        kwargs["teacher_logits"] = data["teacher"]
    kwargs.update(overrides)
    return sdpo_loss(**kwargs)


def _grad(loss: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    (g,) = torch.autograd.grad(loss, x)
    return g


# ----------------------------------------------------------------------------------------------- agreement
@st.composite
def _cases(draw: st.DrawFn, mode: str) -> dict[str, Any]:
    num_positions = draw(st.integers(1, 6))
    vocab = draw(st.integers(2, 40))
    return {
        "seed": draw(st.integers(0, 2**31 - 1)),
        "T": num_positions,
        "V": vocab,
        "mode": mode,
        "alpha": draw(st.sampled_from([0.0, 1.0, 0.5]) | st.floats(0.0, 1.0)),
        "top_k": draw(st.integers(1, vocab + 2)),  # includes K = V - 1, V and above
        "k_teacher": draw(st.integers(1, vocab)),
        "mask": draw(st.lists(st.booleans(), min_size=num_positions, max_size=num_positions)),
        "is_clip": draw(st.sampled_from([0.5, 1.0, 2.0, 5.0]) | st.floats(0.05, 10.0)),
        "rollout": draw(st.booleans()),
        "kl_reg_weight": draw(st.sampled_from([0.0, 0.3])),
        "scale": draw(st.floats(0.3, 4.0)),
        "chunk_size": draw(st.integers(1, 8)),
    }


@pytest.mark.parametrize("mode", MODES)
def test_agrees_with_slow_reference(mode: str) -> None:
    @settings(max_examples=60, deadline=None, derandomize=True, database=None)
    @given(case=_cases(mode))
    def check(case: dict[str, Any]) -> None:
        data = _inputs(case["seed"], case["T"], case["V"], scale=case["scale"], k_teacher=case["k_teacher"])
        rollout = data["rollout"] if case["rollout"] else None
        base = data["base"] if case["kl_reg_weight"] > 0 else None
        mask = case["mask"]
        out = _call(
            data, mode, response_mask=torch.tensor(mask), alpha=case["alpha"], is_clip=case["is_clip"],
            kl_reg_weight=case["kl_reg_weight"], top_k=case["top_k"], rollout_logprobs=rollout, base_logprobs=base,
            chunk_size=case["chunk_size"],
        )
        expected, expected_jsd = reference_loss(
            data["student"], data["teacher"], data["ids"], mask, mode=mode, alpha=case["alpha"], top_k=case["top_k"],
            is_clip=case["is_clip"], kl_reg_weight=case["kl_reg_weight"], rollout=rollout, base=base,
            teacher_topk_logprobs=data["topk_logprobs"], teacher_topk_ids=data["topk_ids"],
        )
        torch.testing.assert_close(out.loss, expected.detach(), rtol=1e-7, atol=1e-10)
        assert out.jsd == pytest.approx(expected_jsd, rel=1e-7, abs=1e-10)
        assert out.tokens == sum(mask)
        if sum(mask):
            torch.testing.assert_close(
                _grad(out.loss, data["student"]), _grad(expected, data["student"]), rtol=1e-6, atol=1e-9
            )

    check()


def test_teacher_topk_from_full_teacher_logits_uses_the_teachers_top_k() -> None:
    data = _inputs(3, 5, 12)
    top = torch.topk(torch.log_softmax(data["teacher"], -1), 4, dim=-1)
    from_logits = _call(data, "teacher_topk", top_k=4, teacher_topk_logprobs=None, teacher_topk_ids=None,
                        teacher_logits=data["teacher"])
    from_topk = _call(data, "teacher_topk", top_k=4, teacher_topk_logprobs=top.values, teacher_topk_ids=top.indices)
    torch.testing.assert_close(from_logits.loss, from_topk.loss)
    torch.testing.assert_close(_grad(from_logits.loss, data["student"]), _grad(from_topk.loss, data["student"]))


# ----------------------------------------------------------------------------------------------- gradcheck
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("with_rollout", [False, True])
def test_gradcheck(mode: str, with_rollout: bool) -> None:
    data = _inputs(7, 4, 6)
    student = data["student"].detach().clone().requires_grad_(True)
    # All ratios above the clip: the (detached) weight is then a constant, as finite differences also see it.
    rollout = data["rollout"] - 20.0 if with_rollout else None
    mask = torch.tensor([True, False, True, True])  # a hole: exercises the gathered (non-view) block path

    def loss_of(x: torch.Tensor) -> torch.Tensor:
        return _call(data, mode, student_logits=x, response_mask=mask, alpha=0.3, kl_reg_weight=0.2,
                     base_logprobs=data["base"], rollout_logprobs=rollout, top_k=2, chunk_size=2).loss

    assert torch.autograd.gradcheck(loss_of, (student,))


def test_gradcheck_student_topk_whole_vocabulary() -> None:
    data = _inputs(8, 3, 5)

    def loss_of(x: torch.Tensor) -> torch.Tensor:
        return _call(data, "student_topk", student_logits=x, top_k=4, alpha=0.7).loss  # K = V - 1: tail of one id

    assert torch.autograd.gradcheck(loss_of, (data["student"].detach().clone().requires_grad_(True),))


# ----------------------------------------------------------------------------------------------- alpha edges
def test_alpha_0_is_forward_kl_teacher_to_student() -> None:
    data = _inputs(11, 5, 9)
    out = _call(data, "full", alpha=0.0)
    log_p, log_q = torch.log_softmax(data["student"], -1), torch.log_softmax(data["teacher"], -1)
    # F.kl_div(input, target) = KL(target || input): here KL(q || p).
    expected = F.kl_div(log_p, log_q, reduction="none", log_target=True).sum(-1).mean()
    torch.testing.assert_close(out.loss, expected)
    torch.testing.assert_close(out.loss, (log_q.exp() * (log_q - log_p)).sum(-1).mean())


def test_alpha_1_is_reverse_kl_student_to_teacher() -> None:
    data = _inputs(12, 5, 9)
    out = _call(data, "full", alpha=1.0)
    log_p, log_q = torch.log_softmax(data["student"], -1), torch.log_softmax(data["teacher"], -1)
    expected = F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1).mean()  # KL(p || q)
    torch.testing.assert_close(out.loss, expected)
    torch.testing.assert_close(out.loss, (log_p.exp() * (log_p - log_q)).sum(-1).mean())


def test_endpoints_are_the_limits_of_the_mixture_formula() -> None:
    """JSD_alpha / alpha -> KL(q || p) as alpha -> 0 and JSD_alpha / (1 - alpha) -> KL(p || q) as alpha -> 1."""
    gen = torch.Generator().manual_seed(13)
    log_p = torch.log_softmax(torch.randn(4, 10, generator=gen, dtype=F64), -1)
    log_q = torch.log_softmax(torch.randn(4, 10, generator=gen, dtype=F64), -1)
    eps = 1e-6
    torch.testing.assert_close(generalized_jsd(log_p, log_q, alpha=eps) / eps, generalized_jsd(log_p, log_q, alpha=0.0),
                               rtol=1e-4, atol=0)
    torch.testing.assert_close(generalized_jsd(log_p, log_q, alpha=1 - eps) / eps,
                               generalized_jsd(log_p, log_q, alpha=1.0), rtol=1e-4, atol=0)


def test_alpha_half_is_symmetric() -> None:
    gen = torch.Generator().manual_seed(14)
    log_p = torch.log_softmax(torch.randn(3, 7, generator=gen, dtype=F64), -1)
    log_q = torch.log_softmax(torch.randn(3, 7, generator=gen, dtype=F64), -1)
    torch.testing.assert_close(generalized_jsd(log_p, log_q, alpha=0.5), generalized_jsd(log_q, log_p, alpha=0.5))


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("mode", MODES)
def test_identical_student_and_teacher_give_zero(alpha: float, mode: str) -> None:
    data = _inputs(15, 4, 10)
    same = data["student"].detach().clone()
    topk_ids = data["topk_ids"]
    out = _call(data, mode, alpha=alpha, teacher_logits=None if mode == "teacher_topk" else same,
                teacher_topk_logprobs=torch.log_softmax(same, -1).gather(-1, topk_ids) if mode == "teacher_topk"
                else None, teacher_topk_ids=topk_ids if mode == "teacher_topk" else None)
    torch.testing.assert_close(out.loss, torch.zeros((), dtype=F64), atol=1e-12, rtol=0)
    assert out.jsd == pytest.approx(0.0, abs=1e-12)
    torch.testing.assert_close(_grad(out.loss, data["student"]), torch.zeros_like(same), atol=1e-12, rtol=0)


# ----------------------------------------------------------------------------------------------- top-K vs full
@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("extra", [-1, 0, 5])  # K = V - 1 (tail = the last id), K = V, K > V
def test_student_topk_covering_the_vocabulary_equals_full(alpha: float, extra: int) -> None:
    data = _inputs(16, 5, 11)
    full = _call(data, "full", alpha=alpha, rollout_logprobs=data["rollout"])
    topk = _call(data, "student_topk", alpha=alpha, top_k=11 + extra, rollout_logprobs=data["rollout"])
    torch.testing.assert_close(topk.loss, full.loss, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(_grad(topk.loss, data["student"]), _grad(full.loss, data["student"]),
                               rtol=1e-9, atol=1e-12)


def test_student_topk_picks_the_students_top_k_and_a_tail_bucket() -> None:
    """One position, V = 4, K = 2: the JSD is over {two most likely student ids, everything else}."""
    student = torch.tensor([[2.0, 0.0, 1.0, -1.0]], dtype=F64, requires_grad=True)
    teacher = torch.tensor([[0.0, 3.0, 0.5, 0.0]], dtype=F64)
    out = sdpo_loss(student_logits=student, teacher_logits=teacher, response_ids=torch.tensor([0]),
                    response_mask=torch.tensor([True]), alpha=0.0, is_clip=1.0, kl_reg_weight=0.0, top_k=2,
                    mode="student_topk")
    p, q = torch.softmax(student.detach()[0], 0), torch.softmax(teacher[0], 0)
    big_p = torch.stack([p[0], p[2], p[1] + p[3]])
    big_q = torch.stack([q[0], q[2], q[1] + q[3]])
    torch.testing.assert_close(out.loss, (big_q * (big_q / big_p).log()).sum())


# ----------------------------------------------------------------------------------------------- IS weights
def test_is_weights_are_clipped_and_reported() -> None:
    data = _inputs(17, 3, 8)
    logp = torch.log_softmax(data["student"].detach(), -1).gather(-1, data["ids"][:, None]).squeeze(-1)
    ratios = torch.tensor([0.5, 3.0, 10.0], dtype=F64)
    out = _call(data, "student_topk", is_clip=2.0, rollout_logprobs=logp - ratios.log())
    assert out.is_ratio_mean == pytest.approx(ratios.mean().item(), rel=1e-9)
    assert out.is_clip_fraction == pytest.approx(2 / 3)
    per_token = torch.stack([
        _call(data, "student_topk", response_mask=torch.arange(3) == t).loss.detach() for t in range(3)
    ])  # JSD_t with weight 1
    weights = torch.tensor([0.5, 2.0, 2.0], dtype=F64)
    torch.testing.assert_close(out.loss, (weights * per_token).mean())
    torch.testing.assert_close(out.student_logprobs, logp)


def test_is_weights_are_detached() -> None:
    """grad(loss with weights) = w_t * grad(JSD_t) row by row: no d(w_t)/d(logits) term."""
    data = _inputs(18, 4, 9)
    logp = torch.log_softmax(data["student"].detach(), -1).gather(-1, data["ids"][:, None]).squeeze(-1)
    ratios = torch.tensor([0.3, 0.8, 1.5, 4.0], dtype=F64)  # one clipped at 2.0, three not
    weighted = _call(data, "full", is_clip=2.0, rollout_logprobs=logp - ratios.log())
    plain = _call(data, "full")
    weights = ratios.clamp(max=2.0)
    torch.testing.assert_close(_grad(weighted.loss, data["student"]),
                               weights[:, None] * _grad(plain.loss, data["student"]))


def test_k3_kl_to_base() -> None:
    data = _inputs(19, 4, 9)
    with_kl = _call(data, "full", kl_reg_weight=0.5, base_logprobs=data["base"])
    without = _call(data, "full")
    logp = torch.log_softmax(data["student"].detach(), -1).gather(-1, data["ids"][:, None]).squeeze(-1)
    d = data["base"] - logp
    k3 = torch.exp(d) - d - 1
    assert with_kl.kl_reg == pytest.approx(k3.mean().item(), rel=1e-9)
    assert without.kl_reg == 0.0
    torch.testing.assert_close(with_kl.loss.detach(), without.loss.detach() + 0.5 * k3.mean())


# ----------------------------------------------------------------------------------------------- masking
@pytest.mark.parametrize("mode", MODES)
def test_masked_positions_change_nothing_and_get_no_gradient(mode: str) -> None:
    data = _inputs(20, 6, 10)
    mask = torch.tensor([True, False, True, True, False, True])
    out = _call(data, mode, response_mask=mask, rollout_logprobs=data["rollout"], kl_reg_weight=0.1,
                base_logprobs=data["base"])
    grad = _grad(out.loss, data["student"])
    # Garbage at masked positions: huge logits, invalid ids, NaN side inputs.
    garbage = {key: value.detach().clone() for key, value in data.items()}
    garbage["student"][~mask] = 1e4
    garbage["student"].requires_grad_(True)
    garbage["teacher"][~mask] = -1e4
    garbage["ids"][~mask] = -100
    garbage["rollout"][~mask] = float("nan")
    garbage["base"][~mask] = float("nan")
    out2 = _call(garbage, mode, response_mask=mask, rollout_logprobs=garbage["rollout"], kl_reg_weight=0.1,
                 base_logprobs=garbage["base"])
    torch.testing.assert_close(out2.loss, out.loss)
    torch.testing.assert_close(_grad(out2.loss, garbage["student"]), grad)
    assert bool((grad[~mask] == 0).all())
    assert bool((out.student_logprobs[~mask] == 0).all())
    # The same loss as on the kept rows alone.
    kept = {key: value.detach()[mask] for key, value in data.items()}
    out3 = _call(kept, mode, rollout_logprobs=kept["rollout"], kl_reg_weight=0.1, base_logprobs=kept["base"])
    torch.testing.assert_close(out3.loss, out.loss.detach())


@pytest.mark.parametrize("mode", MODES)
def test_all_masked_gives_zero_with_zero_grad(mode: str) -> None:
    data = _inputs(21, 3, 7)
    out = _call(data, mode, response_mask=torch.zeros(3, dtype=torch.bool), rollout_logprobs=data["rollout"])
    assert out.loss.item() == 0.0 and out.tokens == 0 and out.jsd == 0.0
    assert out.is_ratio_mean == 1.0 and out.is_clip_fraction == 0.0
    out.loss.backward()
    grad = data["student"].grad
    assert grad is not None and torch.isfinite(grad).all() and bool((grad == 0).all())


def test_empty_response() -> None:
    student = torch.zeros(0, 5, requires_grad=True)
    out = sdpo_loss(student_logits=student, teacher_logits=torch.zeros(0, 5),
                    response_ids=torch.zeros(0, dtype=torch.long), response_mask=torch.zeros(0, dtype=torch.bool),
                    alpha=0.5, is_clip=2.0, kl_reg_weight=0.0, top_k=2, mode="student_topk")
    assert out.loss.item() == 0.0 and out.tokens == 0


# ----------------------------------------------------------------------------------------------- chunking
@pytest.mark.parametrize("mode", MODES)
def test_chunked_equals_unchunked(mode: str) -> None:
    data = _inputs(22, 7, 12)
    mask = torch.tensor([True, True, False, True, True, True, False])

    def run(chunk_size: int) -> tuple[Any, torch.Tensor]:
        out = _call(data, mode, response_mask=mask, chunk_size=chunk_size, rollout_logprobs=data["rollout"],
                    kl_reg_weight=0.2, base_logprobs=data["base"])
        return out, _grad(out.loss, data["student"])

    whole, whole_grad = run(1000)
    for chunk_size in (1, 3):
        out, grad = run(chunk_size)
        torch.testing.assert_close(out.loss, whole.loss)
        torch.testing.assert_close(grad, whole_grad)
        torch.testing.assert_close(out.student_logprobs, whole.student_logprobs)
        for field in ("jsd", "kl_reg", "is_ratio_mean", "is_clip_fraction", "tokens"):
            assert getattr(out, field) == pytest.approx(getattr(whole, field), rel=1e-12)


# ----------------------------------------------------------------------------------------------- autograd plumbing
def test_backward_scales_accumulates_and_skips_work_without_grad() -> None:
    data = _inputs(23, 4, 9)
    base_grad = _grad(_call(data, "student_topk").loss, data["student"])
    out = _call(data, "student_topk")
    (3.0 * out.loss).backward(retain_graph=True)
    out.loss.backward()  # a second backward through the same graph accumulates
    torch.testing.assert_close(data["student"].grad, 4.0 * base_grad)
    with torch.no_grad():
        quiet = _call(data, "student_topk")
    assert quiet.loss.grad_fn is None
    torch.testing.assert_close(quiet.loss, out.loss.detach())


def test_bf16_logits_compute_in_fp32_and_return_bf16_grad() -> None:
    gen = torch.Generator().manual_seed(24)
    student = (2 * torch.randn(5, 64, generator=gen)).to(torch.bfloat16).requires_grad_(True)
    teacher = (2 * torch.randn(5, 64, generator=gen)).to(torch.bfloat16)
    ids = torch.randint(0, 64, (5,), generator=gen)
    common: dict[str, Any] = dict(response_ids=ids, response_mask=torch.ones(5, dtype=torch.bool), alpha=0.5,
                                  is_clip=2.0, kl_reg_weight=0.0, top_k=8, mode="student_topk")
    out = sdpo_loss(student_logits=student, teacher_logits=teacher, **common)
    assert out.loss.dtype == torch.float32 and out.student_logprobs.dtype == torch.float32
    grad = _grad(out.loss, student)
    assert grad.dtype == torch.bfloat16
    upcast = student.detach().float().requires_grad_(True)
    ref = sdpo_loss(student_logits=upcast, teacher_logits=teacher.float(), **common)
    torch.testing.assert_close(out.loss, ref.loss.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad.float(), _grad(ref.loss, upcast), rtol=1e-2, atol=1e-4)


# ----------------------------------------------------------------------------------------------- validation
_T, _V = 3, 6


def _bad_inputs() -> list[tuple[str, dict[str, Any], str]]:
    topk_ids = torch.tensor([[0, 1], [2, 3], [4, 5]])
    return [
        ("alpha below 0", {"alpha": -0.1}, "alpha"),
        ("alpha above 1", {"alpha": 1.5}, "alpha"),
        ("alpha nan", {"alpha": float("nan")}, "alpha"),
        ("is_clip zero", {"is_clip": 0.0}, "is_clip"),
        ("kl weight negative", {"kl_reg_weight": -1.0}, "kl_reg_weight"),
        ("kl weight without base", {"kl_reg_weight": 0.1}, "base_logprobs"),
        ("top_k zero", {"top_k": 0}, "top_k"),
        ("chunk_size zero", {"chunk_size": 0}, "chunk_size"),
        ("unknown mode", {"mode": "reverse_kl"}, "unknown loss mode"),
        ("3-d logits", {"student_logits": torch.zeros(1, _T, _V)}, "student_logits"),
        ("teacher shape", {"teacher_logits": torch.zeros(_T, _V + 1)}, "teacher_logits"),
        ("missing teacher", {"teacher_logits": None}, "teacher_logits"),
        ("both teachers", {"teacher_topk_ids": topk_ids, "teacher_topk_logprobs": torch.zeros(_T, 2)}, "must be None"),
        ("ids shape", {"response_ids": torch.zeros(_T + 1, dtype=torch.long)}, "response_ids"),
        ("ids float", {"response_ids": torch.zeros(_T)}, "integer"),
        ("ids out of range", {"response_ids": torch.tensor([0, _V, 1])}, "response_ids"),
        ("mask shape", {"response_mask": torch.ones(_T + 1, dtype=torch.bool)}, "response_mask"),
        ("mask not 0/1", {"response_mask": torch.tensor([1.0, 0.5, 1.0])}, "response_mask"),
        ("rollout shape", {"rollout_logprobs": torch.zeros(_T, 1)}, "rollout_logprobs"),
        ("base shape", {"kl_reg_weight": 0.1, "base_logprobs": torch.zeros(_T + 2)}, "base_logprobs"),
        ("teacher_topk without ids", {"mode": "teacher_topk", "teacher_logits": None,
                                      "teacher_topk_logprobs": torch.zeros(_T, 2)}, "teacher_topk_ids"),
        ("teacher_topk repeated id", {"mode": "teacher_topk", "teacher_logits": None,
                                      "teacher_topk_logprobs": torch.zeros(_T, 2),
                                      "teacher_topk_ids": torch.tensor([[0, 0], [1, 2], [3, 4]])}, "repeat"),
        ("teacher_topk id out of range", {"mode": "teacher_topk", "teacher_logits": None,
                                          "teacher_topk_logprobs": torch.zeros(_T, 2),
                                          "teacher_topk_ids": torch.tensor([[0, _V], [1, 2], [3, 4]])},
         "teacher_topk_ids"),
        ("teacher_topk -inf", {"mode": "teacher_topk", "teacher_logits": None,
                               "teacher_topk_logprobs": torch.tensor([[0.0, -math.inf]] * _T),
                               "teacher_topk_ids": topk_ids}, "finite"),
        ("teacher_topk shapes differ", {"mode": "teacher_topk", "teacher_logits": None,
                                        "teacher_topk_logprobs": torch.zeros(_T, 3), "teacher_topk_ids": topk_ids},
         "teacher_topk_logprobs"),
    ]


@pytest.mark.parametrize(("case", "overrides", "message"), _bad_inputs(), ids=[c[0] for c in _bad_inputs()])
def test_bad_inputs_raise_value_error(case: str, overrides: dict[str, Any], message: str) -> None:
    kwargs: dict[str, Any] = {
        "student_logits": torch.zeros(_T, _V), "teacher_logits": torch.zeros(_T, _V),
        "response_ids": torch.zeros(_T, dtype=torch.long), "response_mask": torch.ones(_T, dtype=torch.bool),
        "alpha": 0.5, "is_clip": 2.0, "kl_reg_weight": 0.0, "top_k": 2, "mode": "student_topk",
    }
    kwargs.update(overrides)
    with pytest.raises(ValueError, match=message):
        sdpo_loss(**kwargs)


# ----------------------------------------------------------------------------------------------- fused lm_head
def _hidden_inputs(
    seed: int, num_positions: int, hidden: int, vocab: int, *, scale: float = 2.0, k_teacher: int = 4,
    dtype: torch.dtype = F64,
) -> dict[str, Any]:
    """Hidden states, an lm_head (weight + bias) and the side inputs, with logits of std ~ scale."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(vocab, hidden, generator=gen, dtype=F64) * (scale / math.sqrt(hidden))
    student = torch.randn(num_positions, hidden, generator=gen, dtype=F64)
    teacher = student + 0.7 * torch.randn(num_positions, hidden, generator=gen, dtype=F64)
    bias = 0.5 * torch.randn(vocab, generator=gen, dtype=F64)
    ids = torch.randint(0, vocab, (num_positions,), generator=gen)
    k_teacher = min(k_teacher, vocab)
    topk_ids = torch.stack([torch.randperm(vocab, generator=gen)[:k_teacher] for _ in range(num_positions)])
    topk_logprobs = torch.log_softmax(teacher @ weight.T, -1).gather(-1, topk_ids)
    rollout = torch.log_softmax(student @ weight.T, -1).gather(-1, ids[:, None]).squeeze(-1)
    rollout = rollout + torch.randn(num_positions, generator=gen, dtype=F64)
    base = rollout + 0.5 * torch.randn(num_positions, generator=gen, dtype=F64)
    return {
        "student": student.to(dtype).requires_grad_(True), "teacher": teacher.to(dtype), "weight": weight.to(dtype),
        "bias": bias.to(dtype), "ids": ids, "topk_ids": topk_ids, "topk_logprobs": topk_logprobs.to(dtype),
        "rollout": rollout.to(dtype), "base": base.to(dtype),
    }


def _lm_head(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, scale: float) -> torch.Tensor:
    """The logits the fused path stands for, materialized (differentiable in `hidden`)."""
    return F.linear(hidden, weight, bias).to(torch.promote_types(hidden.dtype, torch.float32)) * scale


def _fused_and_materialized(
    data: dict[str, Any], mode: str, *, remote_teacher: bool | None = None, bias: bool = False, scale: float = 1.0,
    student: torch.Tensor | None = None, **overrides: Any,
) -> tuple[Any, Any]:
    """(sdpo_loss_from_hidden, sdpo_loss on the materialized logits) on the same inputs; overrides go to both."""
    student = data["student"] if student is None else student
    lm_bias = data["bias"] if bias else None
    remote = mode == "teacher_topk" if remote_teacher is None else remote_teacher
    common: dict[str, Any] = {
        "response_ids": data["ids"], "response_mask": torch.ones(student.shape[0], dtype=torch.bool), "alpha": 0.5,
        "is_clip": 2.0, "kl_reg_weight": 0.0, "top_k": 3, "mode": mode,
    }
    if remote:
        common.update(teacher_topk_logprobs=data["topk_logprobs"], teacher_topk_ids=data["topk_ids"])
    common.update(overrides)
    fused = sdpo_loss_from_hidden(student_hidden=student, lm_head_weight=data["weight"], lm_head_bias=lm_bias,
                                  logit_scale=scale, teacher_hidden=None if remote else data["teacher"], **common)
    common.pop("chunk_size", None)
    with torch.no_grad():
        teacher_logits = None if remote else _lm_head(data["teacher"], data["weight"], lm_bias, scale)
    plain = sdpo_loss(student_logits=_lm_head(student, data["weight"], lm_bias, scale), teacher_logits=teacher_logits,
                      **common)
    return fused, plain


def _assert_same_output(fused: Any, plain: Any, *, rtol: float | None = None, atol: float | None = None) -> None:
    torch.testing.assert_close(fused.loss.detach(), plain.loss.detach(), rtol=rtol, atol=atol)
    torch.testing.assert_close(fused.student_logprobs, plain.student_logprobs, rtol=rtol, atol=atol)
    for field in ("jsd", "kl_reg", "is_ratio_mean", "is_clip_fraction"):
        assert getattr(fused, field) == pytest.approx(getattr(plain, field), rel=rtol or 1e-7, abs=atol or 1e-10)
    assert fused.tokens == plain.tokens


@st.composite
def _hidden_cases(draw: st.DrawFn, mode: str) -> dict[str, Any]:
    num_positions = draw(st.integers(1, 8))
    vocab = draw(st.integers(3, 50))
    return {
        "seed": draw(st.integers(0, 2**31 - 1)),
        "T": num_positions,
        "H": draw(st.integers(2, 16)),
        "V": vocab,
        "alpha": draw(st.sampled_from([0.0, 1.0, 0.5]) | st.floats(0.0, 1.0)),
        "top_k": draw(st.integers(1, vocab + 2)),
        "k_teacher": draw(st.integers(1, vocab)),
        "remote_teacher": mode == "teacher_topk" and draw(st.booleans()),
        "mask": draw(st.lists(st.booleans(), min_size=num_positions, max_size=num_positions)),
        "is_clip": draw(st.sampled_from([0.5, 2.0]) | st.floats(0.05, 10.0)),
        "rollout": draw(st.booleans()),
        "kl_reg_weight": draw(st.sampled_from([0.0, 0.3])),
        "bias": draw(st.booleans()),
        "logit_scale": draw(st.sampled_from([1.0, 0.5, 2.5])),
        "scale": draw(st.floats(0.3, 4.0)),
        "chunk_size": draw(st.integers(1, 9)),
    }


@pytest.mark.parametrize("mode", MODES)
def test_from_hidden_equals_sdpo_loss_on_materialized_logits(mode: str) -> None:
    """Values, diagnostics and d(loss)/d(hidden) equal autograd through h @ W^T + b -> sdpo_loss (fp64)."""

    @settings(max_examples=50, deadline=None, derandomize=True, database=None)
    @given(case=_hidden_cases(mode))
    def check(case: dict[str, Any]) -> None:
        data = _hidden_inputs(case["seed"], case["T"], case["H"], case["V"], scale=case["scale"],
                              k_teacher=case["k_teacher"])
        fused, plain = _fused_and_materialized(
            data, mode, remote_teacher=case["remote_teacher"], bias=case["bias"], scale=case["logit_scale"],
            response_mask=torch.tensor(case["mask"]), alpha=case["alpha"], is_clip=case["is_clip"],
            kl_reg_weight=case["kl_reg_weight"], top_k=case["top_k"],
            rollout_logprobs=data["rollout"] if case["rollout"] else None,
            base_logprobs=data["base"] if case["kl_reg_weight"] > 0 else None, chunk_size=case["chunk_size"],
        )
        _assert_same_output(fused, plain, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(_grad(fused.loss, data["student"]), _grad(plain.loss, data["student"]),
                                   rtol=1e-9, atol=1e-12)

    check()


@pytest.mark.parametrize("mode", MODES)
def test_from_hidden_fp32_matches_materialized_logits(mode: str) -> None:
    data = _hidden_inputs(31, 7, 16, 48, dtype=torch.float32)
    fused, plain = _fused_and_materialized(data, mode, bias=True, top_k=5, rollout_logprobs=data["rollout"],
                                           kl_reg_weight=0.1, base_logprobs=data["base"], chunk_size=3)
    _assert_same_output(fused, plain, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(_grad(fused.loss, data["student"]), _grad(plain.loss, data["student"]),
                               rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("with_rollout", [False, True])
def test_from_hidden_gradcheck(mode: str, with_rollout: bool) -> None:
    data = _hidden_inputs(32, 4, 5, 7)
    rollout = data["rollout"] - 20.0 if with_rollout else None  # ratios all clipped: a constant weight, as in gradcheck
    mask = torch.tensor([True, False, True, True])

    def loss_of(hidden: torch.Tensor) -> torch.Tensor:
        fused, _ = _fused_and_materialized(
            data, mode, student=hidden, bias=True, scale=1.5, response_mask=mask, alpha=0.3, top_k=2,
            kl_reg_weight=0.2, base_logprobs=data["base"], rollout_logprobs=rollout, chunk_size=2,
        )
        return fused.loss

    assert torch.autograd.gradcheck(loss_of, (data["student"].detach().clone().requires_grad_(True),))


@pytest.mark.parametrize("mode", MODES)
def test_from_hidden_chunk_sizes_agree(mode: str) -> None:
    data = _hidden_inputs(33, 7, 6, 13)
    mask = torch.tensor([True, True, False, True, True, True, False])

    def run(chunk_size: int) -> tuple[Any, torch.Tensor]:
        fused, _ = _fused_and_materialized(data, mode, response_mask=mask, chunk_size=chunk_size,
                                           rollout_logprobs=data["rollout"], kl_reg_weight=0.2,
                                           base_logprobs=data["base"])
        return fused, _grad(fused.loss, data["student"])

    whole, whole_grad = run(10_000)
    for chunk_size in (1, 3):
        out, grad = run(chunk_size)
        _assert_same_output(out, whole, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(grad, whole_grad, rtol=1e-12, atol=1e-14)


def test_from_hidden_ignores_masked_rows_and_scales_backward() -> None:
    data = _hidden_inputs(34, 5, 4, 9)
    mask = torch.tensor([True, False, True, False, True])
    fused, plain = _fused_and_materialized(data, "student_topk", response_mask=mask)
    grad = _grad(plain.loss, data["student"])
    garbage = data["student"].detach().clone()
    garbage[~mask] = float("nan")  # never multiplied by the lm_head
    garbage.requires_grad_(True)
    fused_nan, _ = _fused_and_materialized(data, "student_topk", student=garbage, response_mask=mask)
    torch.testing.assert_close(fused_nan.loss, fused.loss)
    (3.0 * fused_nan.loss).backward(retain_graph=True)
    fused_nan.loss.backward()
    assert garbage.grad is not None
    torch.testing.assert_close(garbage.grad, 4.0 * grad)
    assert bool((garbage.grad[~mask] == 0).all())


def test_from_hidden_all_masked_and_no_grad() -> None:
    data = _hidden_inputs(35, 3, 4, 6)
    fused, _ = _fused_and_materialized(data, "full", response_mask=torch.zeros(3, dtype=torch.bool))
    assert fused.loss.item() == 0.0 and fused.tokens == 0
    torch.testing.assert_close(_grad(fused.loss, data["student"]), torch.zeros_like(data["student"]))
    weight = data["weight"].clone().requires_grad_(True)  # a trainable lm_head is fine when no gradient is taken
    with torch.no_grad():
        quiet = sdpo_loss_from_hidden(student_hidden=data["student"], lm_head_weight=weight,
                                      teacher_hidden=data["teacher"], response_ids=data["ids"],
                                      response_mask=torch.ones(3, dtype=torch.bool), alpha=0.5, is_clip=2.0,
                                      kl_reg_weight=0.0, top_k=2, mode="student_topk")
    assert quiet.loss.grad_fn is None and quiet.loss.item() > 0


@pytest.mark.parametrize("logit_scale", [1.0, 2.0])  # 1.0 keeps a block's logits in bf16, 2.0 scales them in fp32
def test_from_hidden_bf16_matches_upcast_logits_and_returns_bf16_grad(logit_scale: float) -> None:
    """bf16 hidden states and lm_head: the product in bf16, the loss in fp32, like model(...).logits.float()."""
    data = _hidden_inputs(36, 6, 32, 64, dtype=torch.bfloat16)
    fused, plain = _fused_and_materialized(data, "student_topk", top_k=8, rollout_logprobs=data["rollout"],
                                           chunk_size=4, scale=logit_scale)
    assert fused.loss.dtype == torch.float32 and fused.student_logprobs.dtype == torch.float32
    _assert_same_output(fused, plain, rtol=1e-5, atol=1e-6)
    grad = _grad(fused.loss, data["student"])
    assert grad.dtype == torch.bfloat16
    torch.testing.assert_close(grad.float(), _grad(plain.loss, data["student"]).float(), rtol=2e-2, atol=1e-4)


class _LargestOutput(TorchDispatchMode):
    """Records the largest tensor any aten op produces while active."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for item in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(item, torch.Tensor):
                self.largest = max(self.largest, item.numel())
        return out


@pytest.mark.parametrize("mode", MODES)
def test_from_hidden_never_builds_a_full_logits_tensor(mode: str) -> None:
    num_positions, hidden, vocab, chunk = 32, 8, 97, 4
    data = _hidden_inputs(37, num_positions, hidden, vocab)
    kwargs: dict[str, Any] = {"mode": mode, "alpha": 0.5, "is_clip": 2.0, "kl_reg_weight": 0.0, "top_k": 5}
    recorder = _LargestOutput()
    with recorder:
        out = sdpo_loss_from_hidden(student_hidden=data["student"], lm_head_weight=data["weight"],
                                    teacher_hidden=data["teacher"], response_ids=data["ids"],
                                    response_mask=torch.ones(num_positions, dtype=torch.bool), chunk_size=chunk,
                                    **kwargs)
        out.loss.backward()
    assert recorder.largest <= max(chunk * vocab, vocab * hidden)  # a block's logits, or the lm_head itself
    assert recorder.largest < num_positions * vocab


_TH, _HH, _VH = 3, 4, 6


def _bad_hidden_inputs() -> list[tuple[str, dict[str, Any], str]]:
    return [
        ("H mismatch", {"lm_head_weight": torch.zeros(_VH, _HH + 1)}, "hidden size"),
        ("1-d hidden", {"student_hidden": torch.zeros(_HH)}, "student_hidden"),
        ("1-d weight", {"lm_head_weight": torch.zeros(_VH)}, "lm_head_weight"),
        ("teacher_hidden shape", {"teacher_hidden": torch.zeros(_TH + 1, _HH)}, "teacher_hidden"),
        ("teacher_hidden missing, student_topk", {"teacher_hidden": None}, "needs teacher_hidden"),
        ("teacher_hidden missing, full", {"teacher_hidden": None, "mode": "full"}, "needs teacher_hidden"),
        ("teacher_topk without any teacher", {"teacher_hidden": None, "mode": "teacher_topk"}, "teacher_hidden"),
        ("bias shape", {"lm_head_bias": torch.zeros(_VH + 1)}, "lm_head_bias"),
        ("dtype mismatch", {"lm_head_weight": torch.zeros(_VH, _HH, dtype=F64)}, "dtype|float64"),
        ("trainable lm_head", {"lm_head_weight": torch.zeros(_VH, _HH, requires_grad=True)}, "requires grad"),
        ("trainable bias", {"lm_head_bias": torch.zeros(_VH, requires_grad=True)}, "requires grad"),
        ("logit_scale zero", {"logit_scale": 0.0}, "logit_scale"),
        ("logit_scale nan", {"logit_scale": float("nan")}, "logit_scale"),
        ("ids out of vocab", {"response_ids": torch.tensor([0, _VH, 1])}, "response_ids"),
        ("alpha", {"alpha": 2.0}, "alpha"),
        ("chunk_size", {"chunk_size": 0}, "chunk_size"),
    ]


@pytest.mark.parametrize(("case", "overrides", "message"), _bad_hidden_inputs(),
                         ids=[c[0] for c in _bad_hidden_inputs()])
def test_from_hidden_bad_inputs_raise_value_error(case: str, overrides: dict[str, Any], message: str) -> None:
    kwargs: dict[str, Any] = {
        "student_hidden": torch.zeros(_TH, _HH, requires_grad=True), "lm_head_weight": torch.zeros(_VH, _HH),
        "teacher_hidden": torch.zeros(_TH, _HH), "response_ids": torch.zeros(_TH, dtype=torch.long),
        "response_mask": torch.ones(_TH, dtype=torch.bool), "alpha": 0.5, "is_clip": 2.0, "kl_reg_weight": 0.0,
        "top_k": 2, "mode": "student_topk",
    }
    kwargs.update(overrides)
    with pytest.raises(ValueError, match=message):
        sdpo_loss_from_hidden(**kwargs)
