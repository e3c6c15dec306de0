"""Collapse alarms: signs that training is wrecking the model rather than teaching it.

- `entropy_mean`: mean per-token entropy of greedy answers (nats), estimated from the server's top-K logprobs plus
  one tail bucket for the remaining mass; a fall towards 0 against the baseline means the model turns deterministic.
- `self_rouge_l`: mean pairwise ROUGE-L F1 between sampled answers to one prompt; a rise towards 1 means every
  sample says the same thing.
- `reference_logprob`: mean per-token logprob of a fixed reference answer; its drift from the baseline measures how
  far the adapter moved on text unrelated to the preference.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

from rouge_score import rouge_scorer

from claas.eval.metrics.base import MeasureContext, Measurement, Metric, register

TOP_LOGPROBS = 20


def topk_entropy(top_logprobs: Sequence[float]) -> float:
    """Entropy (nats) of a distribution known by its top-K log-probabilities plus one tail bucket holding the rest."""
    probs = [math.exp(lp) for lp in top_logprobs]
    tail = max(0.0, 1.0 - sum(probs))
    return -sum(p * math.log(p) for p in [*probs, tail] if p > 0.0)


def mean_token_entropy(per_token_top_logprobs: Sequence[Sequence[float]]) -> float:
    rows = [row for row in per_token_top_logprobs if row]
    if not rows:
        raise ValueError("no per-token top logprobs (ask the server for logprobs with top_logprobs)")
    return sum(topk_entropy(row) for row in rows) / len(rows)


def self_rouge_l(samples: Sequence[str]) -> float:
    """Mean ROUGE-L F1 over all pairs of samples (1.0 = identical)."""
    if len(samples) < 2:
        raise ValueError("self-ROUGE needs at least two samples")
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    pairs = list(itertools.combinations(samples, 2))
    return sum(scorer.score(a, b)["rougeL"].fmeasure for a, b in pairs) / len(pairs)


@register
class CollapseMetric(Metric):
    name = "collapse"
    slow = True

    def measure(self, ctx: MeasureContext) -> Measurement:
        cfg, collapse = ctx.config.measure, ctx.config.collapse

        def entropy(prompt: str) -> float:
            answer = ctx.client.chat(
                ctx.model, prompt, max_tokens=cfg.max_tokens, temperature=0.0, top_logprobs=TOP_LOGPROBS
            )[0]
            return mean_token_entropy(answer.top_logprobs)

        entropies = ctx.map(entropy, ctx.preference.probes(cfg.probe_limit))
        samples = [
            answer.text
            for answer in ctx.client.chat(
                ctx.model,
                collapse.sample_prompt,
                max_tokens=cfg.max_tokens,
                temperature=cfg.sampled_temperature,
                seed=ctx.seed,
                n=collapse.samples,
            )
        ]
        reference = ctx.client.score(ctx.model, collapse.reference_prompt, collapse.reference_text)
        return Measurement(
            values={
                "entropy_mean": sum(entropies) / len(entropies),
                "self_rouge_l": self_rouge_l(samples),
                "reference_logprob": float(reference["mean_logprob"]),
            },
            details={"samples": samples},
        )
