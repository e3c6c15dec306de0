"""Logprob margin: log p(preferred) - log p(dispreferred) under the adapter, through `/v1/score`, averaged over a
preference's pairs. It moves before greedy answers do, so it shows whether a step pushed the right way."""

from __future__ import annotations

from claas.eval.metrics.base import MeasureContext, Measurement, Metric, register


def logprob_margin(preferred_sums: list[float], dispreferred_sums: list[float]) -> float:
    """Mean over pairs of the difference of total log-probabilities (nats)."""
    if len(preferred_sums) != len(dispreferred_sums) or not preferred_sums:
        raise ValueError("need one preferred and one dispreferred score per pair, and at least one pair")
    return sum(p - d for p, d in zip(preferred_sums, dispreferred_sums)) / len(preferred_sums)


@register
class MarginMetric(Metric):
    name = "margin"
    slow = False

    def measure(self, ctx: MeasureContext) -> Measurement:
        pairs = ctx.preference.logprob_pairs
        texts = [(pair.prompt, pair.preferred) for pair in pairs] + [(pair.prompt, pair.dispreferred) for pair in pairs]
        sums = ctx.map(lambda text: ctx.client.score(ctx.model, *text)["sum_logprob"], texts)
        preferred, dispreferred = sums[: len(pairs)], sums[len(pairs) :]
        return Measurement(
            values={"margin": logprob_margin(preferred, dispreferred)},
            details={"preferred_logprob": preferred, "dispreferred_logprob": dispreferred},
        )
