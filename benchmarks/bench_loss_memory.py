"""Peak memory of the chunked SDPO loss vs naive full-vocabulary implementations (CPU, forward + backward).

Two comparisons in one run:

1. Logits in (`sdpo_loss`): [T, V] student and teacher logits are the inputs; the chunked loss vs the naive one. Both
   must hand the caller the [T, V] gradient w.r.t. the logits, which bounds this ratio from below.
2. Hidden states in (`sdpo_loss_from_hidden`, the headline figures): [T, H] student and teacher final hidden states
   and the [V, H] lm_head are the inputs; the fused path (lm_head + loss per block of positions, gradient w.r.t. the
   hidden states) vs a naive one that materializes the [T, V] logits with F.linear(h, W).float() and runs the naive
   loss, autograd through everything. By default H = 4096 (Qwen3-8B) with the lm_head and hidden states stored in
   bf16, as a bf16 model holds them; both paths multiply in bf16 and compute the loss in fp32.

Each variant runs in a fresh process (multiprocessing "spawn"), so the peak resident set size of that process is the
peak of that variant alone. The process builds the inputs, resets the kernel's peak-RSS counter (/proc/self/clear_refs;
if that is refused it falls back to ru_maxrss, which then also counts the input set-up), runs loss + backward, and
reports peak RSS minus the RSS just before the run. Inputs (logits, hidden states, lm_head) are not counted.

All variants compute the same quantity: the generalized JSD over the student's top-K plus a tail bucket
("student_topk"), IS weights from rollout logprobs and a k3 KL to the base, token-mean. The naive one does it the
direct way (log_softmax over [T, V] for both sides, gather, backward through autograd); it runs in two forms
(torch.log_softmax and x - logsumexp(x)), the leaner peak is the memory baseline and the more accurate form the value
reference.

Run: .venv/bin/python benchmarks/bench_loss_memory.py [--T 2048 --V 151936 --k 100 --H 4096 --chunk-size 256]
The last line printed is one JSON object: peak_ratio, max_rel_diff, grad_max_rel_diff, fused_peak_mb, naive_peak_mb
(hidden-state path), logits_peak_ratio, logits_max_rel_diff, ... (logits-in path), T, V, K, H.
Needs about 2 x T x V x 4 bytes for the logits-in inputs plus the naive peak (~7.5 GB at the defaults); the
hidden-state part needs V x H x 2 bytes for the bf16 lm_head (1.2 GB) plus its naive peak. Takes a few minutes on
2 cores (the [T, H] x [H, V] products dominate the hidden-state part).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import multiprocessing as mp
import os
import resource
import time
from typing import Any

MIB = 1024 * 1024
GRAD_SAMPLE_ROWS = (0, 1, 7)  # rows of the gradient sent back for the value comparison (tail rows added below)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0). False if the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def naive_loss(
    student_logits: Any,
    teacher_logits: Any,
    response_ids: Any,
    response_mask: Any,
    rollout_logprobs: Any,
    base_logprobs: Any,
    *,
    alpha: float,
    is_clip: float,
    kl_reg_weight: float,
    top_k: int,
    normalize: str,
) -> Any:
    """Student-top-K + tail generalized JSD written the direct way: every step on the whole [T, V].

    normalize="log_softmax" uses torch.log_softmax (the leanest: ~3 [T, V] at the peak); "logsumexp" writes it as
    x - logsumexp(x), whose fp32 CPU reduction is far more accurate at V = 152k (see the module docstring).
    """
    import torch
    import torch.nn.functional as F

    def with_tail(logp: Any) -> Any:  # [T, K] -> [T, K + 1]
        log_mass = torch.logsumexp(logp, dim=-1, keepdim=True).clamp(max=-torch.finfo(logp.dtype).eps)
        return torch.cat([logp, torch.log(-torch.expm1(log_mass))], dim=-1)

    def log_probs(z: Any) -> Any:  # [T, V] -> [T, V]
        if normalize == "log_softmax":
            return torch.log_softmax(z, dim=-1)
        return z - torch.logsumexp(z, dim=-1, keepdim=True)

    s_all = log_probs(student_logits.float())  # [T, V]
    t_all = log_probs(teacher_logits.float())  # [T, V]
    top = s_all.detach().topk(top_k, dim=-1).indices  # [T, K]
    p = with_tail(s_all.gather(-1, top))  # [T, K + 1]
    q = with_tail(t_all.gather(-1, top))  # [T, K + 1]
    log_m = torch.logaddexp(p + math.log1p(-alpha), q + math.log(alpha))
    jsd = (1 - alpha) * F.kl_div(log_m, p, reduction="none", log_target=True).sum(-1) + alpha * F.kl_div(
        log_m, q, reduction="none", log_target=True
    ).sum(-1)  # [T]
    logp = s_all.gather(-1, response_ids[:, None]).squeeze(-1)  # [T]
    weight = torch.exp((logp.detach() - rollout_logprobs).clamp(-20, 20)).clamp(max=is_clip)
    d = (base_logprobs - logp).clamp(-20, 20)
    k3 = torch.exp(d) - d - 1
    m = response_mask.float()
    denom = m.sum().clamp(min=1)
    return (m * (weight * jsd + kl_reg_weight * k3)).sum() / denom, ((m * jsd).sum() / denom).item()


def _student_topk_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {"alpha": args.alpha, "is_clip": args.is_clip, "kl_reg_weight": args.kl_reg_weight, "top_k": args.k}


def _side_inputs(T: int, V: int, gen: Any, token_logits: Any) -> tuple[Any, Any, Any, Any]:
    """Response ids, mask (padding at the end, as a batch would have) and rollout / base log-probs derived from the
    student's token log-probs; token_logits(i, j) gives the student's logits of rows i:j (computed in small blocks)."""
    import torch

    response_ids = torch.randint(0, V, (T,), generator=gen)
    response_mask = torch.ones(T, dtype=torch.bool)
    response_mask[-max(T // 16, 1) :] = False
    with torch.no_grad():
        token_logp = torch.cat(
            [
                torch.log_softmax(token_logits(i, min(i + 64, T)).float(), -1)
                .gather(-1, response_ids[i : i + 64, None])
                .squeeze(-1)
                for i in range(0, T, 64)
            ]
        )
    rollout = token_logp + 0.5 * torch.randn(T, generator=gen)
    base = token_logp + 0.5 * torch.randn(T, generator=gen)
    return response_ids, response_mask, rollout, base


def run_logits_variant(variant: str, args: argparse.Namespace) -> dict[str, Any]:
    """Logits in: build [T, V] student/teacher logits, run one variant forward + backward, measure its peak."""
    import torch

    from claas.training.sdpo_loss import sdpo_loss

    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(args.seed)
    T, V = args.T, args.V
    # Built in place so the set-up leaves no freed [T, V] temporaries behind.
    student = torch.randn(T, V, generator=gen).mul_(args.logit_scale)
    teacher = torch.randn(T, V, generator=gen).mul_(0.5 * args.logit_scale).add_(student)  # a nearby teacher
    response_ids, response_mask, rollout, base = _side_inputs(T, V, gen, lambda i, j: student[i:j])
    student.requires_grad_(True)
    gc.collect()

    reset_ok = _reset_peak_rss()
    rss_before = _rss_bytes()
    t0 = time.perf_counter()
    if variant == "chunked":
        out = sdpo_loss(
            student_logits=student, teacher_logits=teacher, response_ids=response_ids, response_mask=response_mask,
            mode="student_topk", rollout_logprobs=rollout, base_logprobs=base, chunk_size=args.chunk_size,
            **_student_topk_kwargs(args),
        )
        loss, jsd = out.loss, out.jsd
    else:
        loss, jsd = naive_loss(
            student, teacher, response_ids, response_mask, rollout, base, **_student_topk_kwargs(args),
            normalize="log_softmax" if variant == "naive" else "logsumexp",
        )
    loss.backward()
    seconds = time.perf_counter() - t0
    peak = _peak_rss_bytes()
    grad = student.grad
    assert grad is not None  # benchmark-internal sanity, not input validation
    rows = sorted({r % T for r in (*GRAD_SAMPLE_ROWS, T - max(T // 16, 1) - 1, T - 1)})
    return {
        "variant": variant,
        "peak_extra_bytes": peak - rss_before,
        "peak_reset": reset_ok,
        "seconds": seconds,
        "loss": loss.item(),
        "jsd": jsd,
        "grad_rows": grad[rows].tolist(),  # plain lists: a tensor would travel through shared memory
        "grad_bytes": grad.numel() * grad.element_size(),
    }


def run_hidden_variant(variant: str, args: argparse.Namespace) -> dict[str, Any]:
    """Hidden states in: build [T, H] hidden states and a [V, H] lm_head, run one variant forward + backward."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from claas.training.sdpo_loss import sdpo_loss_from_hidden

    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(args.seed)
    T, V, H = args.T, args.V, args.H
    dtype = getattr(torch, args.hidden_dtype)
    # Logits ~ N(0, logit_scale^2): unit hidden states, lm_head entries of std logit_scale / sqrt(H). Filled in row
    # blocks so that no fp32 copy of the whole lm_head is ever made.
    weight = torch.empty(V, H, dtype=dtype)
    for i in range(0, V, 8192):
        rows = min(8192, V - i)
        weight[i : i + rows] = torch.randn(rows, H, generator=gen).mul_(args.logit_scale / math.sqrt(H))
    student_fp32 = torch.randn(T, H, generator=gen)
    student = student_fp32.to(dtype, copy=True)
    teacher = student_fp32.add_(torch.randn(T, H, generator=gen), alpha=0.5).to(dtype)  # a nearby teacher
    del student_fp32
    response_ids, response_mask, rollout, base = _side_inputs(
        T, V, gen, lambda i, j: F.linear(student[i:j], weight)
    )
    student.requires_grad_(True)
    gc.collect()

    reset_ok = _reset_peak_rss()
    rss_before = _rss_bytes()
    t0 = time.perf_counter()
    if variant == "fused":
        out = sdpo_loss_from_hidden(
            student_hidden=student, teacher_hidden=teacher, lm_head_weight=weight, response_ids=response_ids,
            response_mask=response_mask, mode="student_topk", rollout_logprobs=rollout, base_logprobs=base,
            chunk_size=args.chunk_size, **_student_topk_kwargs(args),
        )
        loss, jsd = out.loss, out.jsd
    else:  # the [T, V] logits materialized, as model(...).logits.float() would give them
        student_logits = F.linear(student, weight).float()  # [T, V]
        with torch.no_grad():
            teacher_logits = F.linear(teacher, weight).float()  # [T, V]
        loss, jsd = naive_loss(
            student_logits, teacher_logits, response_ids, response_mask, rollout, base, **_student_topk_kwargs(args),
            normalize="log_softmax" if variant == "naive" else "logsumexp",
        )
        del student_logits, teacher_logits
    loss.backward()
    seconds = time.perf_counter() - t0
    peak = _peak_rss_bytes()
    grad = student.grad
    assert grad is not None  # benchmark-internal sanity, not input validation
    return {
        "variant": variant,
        "peak_extra_bytes": peak - rss_before,
        "peak_reset": reset_ok,
        "seconds": seconds,
        "loss": loss.item(),
        "jsd": jsd,
        "grad": np.ascontiguousarray(grad.float().numpy()).tobytes(),  # the whole [T, H] gradient, fp32 bytes
        "grad_bytes": grad.numel() * grad.element_size(),
    }


def _in_fresh_process(run: Any, variant: str, args: argparse.Namespace) -> dict[str, Any]:
    with mp.get_context("spawn").Pool(1, maxtasksperchild=1) as pool:
        return pool.apply(run, (variant, args))


def _rel_diff(a: dict[str, Any], b: dict[str, Any]) -> float:
    """Max relative difference of loss and jsd, b being the reference."""
    return max(abs(a[key] - b[key]) / max(abs(b[key]), 1e-30) for key in ("loss", "jsd"))


def _print_variant(name: str, r: dict[str, Any]) -> None:
    print(f"  {name:18s} peak extra {r['peak_extra_bytes'] / MIB:8.1f} MiB   {r['seconds']:6.2f} s   "
          f"loss {r['loss']:.9f}   jsd {r['jsd']:.9f}", flush=True)


def logits_comparison(args: argparse.Namespace) -> dict[str, Any]:
    """Part 1: sdpo_loss on [T, V] logits vs the naive loss; keys prefixed logits_."""
    import torch

    inputs_mb = 2 * args.T * args.V * 4 / MIB
    print(f"1. logits in: sdpo_loss, CPU fp32, inputs {inputs_mb:.0f} MiB (student + teacher logits)", flush=True)
    results = {}
    for variant in ("chunked", "naive", "naive_lse"):
        results[variant] = _in_fresh_process(run_logits_variant, variant, args)
        _print_variant(variant, results[variant])
    chunked, naive, naive_lse = results["chunked"], results["naive"], results["naive_lse"]
    grad_mb = chunked["grad_bytes"] / MIB
    chunked_mb = chunked["peak_extra_bytes"] / MIB
    # The leaner of the two naive forms is the memory baseline (the conservative choice for the ratio).
    naive_mb = min(naive["peak_extra_bytes"], naive_lse["peak_extra_bytes"]) / MIB
    g_c, g_n = torch.tensor(chunked["grad_rows"]), torch.tensor(naive_lse["grad_rows"])
    grad_rel = ((g_c - g_n).abs().max() / g_n.abs().max().clamp(min=1e-30)).item()
    summary = {
        "logits_peak_ratio": round(chunked_mb / naive_mb, 4),
        "logits_max_rel_diff": _rel_diff(chunked, naive_lse),
        "logits_max_rel_diff_vs_torch_log_softmax": _rel_diff(chunked, naive),
        "logits_grad_max_rel_diff": grad_rel,
        "logits_chunked_peak_mb": round(chunked_mb, 1),
        "logits_naive_peak_mb": round(naive_mb, 1),
        "logits_naive_log_softmax_peak_mb": round(naive["peak_extra_bytes"] / MIB, 1),
        "logits_naive_logsumexp_peak_mb": round(naive_lse["peak_extra_bytes"] / MIB, 1),
        "logits_grad_mb": round(grad_mb, 1),
        "logits_peak_ratio_excl_grad": round((chunked_mb - grad_mb) / (naive_mb - grad_mb), 4),
        "logits_chunked_s": round(chunked["seconds"], 2),
        "logits_naive_s": round(naive["seconds"], 2),
    }
    print(f"  peak ratio chunked/naive {summary['logits_peak_ratio']:.4f}; both peaks include the {grad_mb:.0f} MiB "
          f"[T, V] gradient the caller receives, which no logits-in loss can avoid (without it: "
          f"{summary['logits_peak_ratio_excl_grad']:.4f}); loss/jsd rel. diff {summary['logits_max_rel_diff']:.2e}, "
          f"sampled gradient rows {grad_rel:.2e}", flush=True)
    return {"_peak_reset": all(r["peak_reset"] for r in results.values()), **summary}


def hidden_comparison(args: argparse.Namespace) -> dict[str, Any]:
    """Part 2: sdpo_loss_from_hidden vs materialized logits + naive loss; the headline keys."""
    import numpy as np

    weight_mb = args.V * args.H * (2 if args.hidden_dtype == "bfloat16" else 4) / MIB
    print(f"2. hidden states in: sdpo_loss_from_hidden, H={args.H}, lm_head + hidden states in {args.hidden_dtype} "
          f"(lm_head {weight_mb:.0f} MiB), loss in fp32", flush=True)
    results = {}
    for variant in ("fused", "naive", "naive_lse"):
        results[variant] = _in_fresh_process(run_hidden_variant, variant, args)
        _print_variant(variant, results[variant])
    fused, naive, naive_lse = results["fused"], results["naive"], results["naive_lse"]
    fused_mb = fused["peak_extra_bytes"] / MIB
    naive_mb = min(naive["peak_extra_bytes"], naive_lse["peak_extra_bytes"]) / MIB
    g_f = np.frombuffer(fused["grad"], dtype=np.float32)
    g_n = np.frombuffer(naive_lse["grad"], dtype=np.float32)
    grad_rel = float(np.abs(g_f - g_n).max() / max(float(np.abs(g_n).max()), 1e-30))
    grad_rel_vs_log_softmax = float(
        np.abs(g_f - np.frombuffer(naive["grad"], dtype=np.float32)).max() / max(float(np.abs(g_n).max()), 1e-30)
    )
    summary = {
        "peak_ratio": round(fused_mb / naive_mb, 4),
        "max_rel_diff": _rel_diff(fused, naive_lse),
        "max_rel_diff_vs_torch_log_softmax": _rel_diff(fused, naive),
        "grad_max_rel_diff": grad_rel,
        "grad_max_rel_diff_vs_torch_log_softmax": grad_rel_vs_log_softmax,
        "fused_peak_mb": round(fused_mb, 1),
        "naive_peak_mb": round(naive_mb, 1),
        "naive_log_softmax_peak_mb": round(naive["peak_extra_bytes"] / MIB, 1),
        "naive_logsumexp_peak_mb": round(naive_lse["peak_extra_bytes"] / MIB, 1),
        "hidden_grad_mb": round(fused["grad_bytes"] / MIB, 1),
        "loss_fused": fused["loss"],
        "loss_naive": naive_lse["loss"],
        "fused_s": round(fused["seconds"], 2),
        "naive_s": round(naive["seconds"], 2),
    }
    print(f"  peak ratio fused/naive {summary['peak_ratio']:.4f} (target <= 0.1); loss/jsd rel. diff "
          f"{summary['max_rel_diff']:.2e} (target <= 1e-5); d loss/d hidden max|diff| / max|grad| {grad_rel:.2e}",
          flush=True)
    return {"_peak_reset": all(r["peak_reset"] for r in results.values()), **summary}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--T", type=int, default=2048, help="response positions")
    parser.add_argument("--V", type=int, default=151_936, help="vocabulary size (Qwen3's by default)")
    parser.add_argument("--H", type=int, default=4096, help="hidden size (Qwen3-8B's by default)")
    parser.add_argument("--hidden-dtype", choices=("bfloat16", "float32"), default="bfloat16",
                        help="storage dtype of the lm_head and hidden states in part 2")
    parser.add_argument("--k", type=int, default=100, help="student top-K")
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--is-clip", type=float, default=5.0)
    parser.add_argument("--kl-reg-weight", type=float, default=0.01)
    parser.add_argument("--logit-scale", type=float, default=3.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", choices=("logits", "hidden"), default=None,
                        help="run one part only (development; the JSON then lacks the other part's keys)")
    args = parser.parse_args()

    print(f"SDPO loss memory: T={args.T} V={args.V} K={args.k} H={args.H} chunk={args.chunk_size}, CPU, "
          f"forward + backward, each variant in a fresh process", flush=True)
    parts: dict[str, Any] = {}
    if args.only in (None, "logits"):
        parts.update(logits_comparison(args))
        reset_logits = parts.pop("_peak_reset")
    else:
        reset_logits = True
    if args.only in (None, "hidden"):
        parts.update(hidden_comparison(args))
        reset_hidden = parts.pop("_peak_reset")
    else:
        reset_hidden = True
    summary = {
        "T": args.T,
        "V": args.V,
        "K": args.k,
        "H": args.H,
        "hidden_dtype": args.hidden_dtype,
        "chunk_size": args.chunk_size,
        **parts,
        "peak_rss_reset": reset_logits and reset_hidden,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
