"""Compliance: the verifier's pass rate on the preference's held-out probe prompts (never trained on), greedy and
sampled. This is the outcome a user sees."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from claas.eval.metrics.base import MeasureContext, Measurement, Metric, register
from claas.eval.verifiers import Answer


def pass_rate(answers: Sequence[Answer], verifier: Callable[[Answer], bool]) -> float:
    if not answers:
        raise ValueError("no answers to verify")
    return sum(bool(verifier(answer)) for answer in answers) / len(answers)


@register
class ComplianceMetric(Metric):
    name = "compliance"
    slow = False

    def measure(self, ctx: MeasureContext) -> Measurement:
        cfg = ctx.config.measure
        verifier = ctx.preference.build_verifier()
        probes = ctx.preference.probes(cfg.probe_limit)

        def answers(indexed: tuple[int, str]) -> tuple[Answer, list[Answer]]:
            index, prompt = indexed
            served = ctx.client.chat(ctx.model, prompt, max_tokens=cfg.max_tokens, temperature=0.0)[0]
            samples = ctx.client.chat(
                ctx.model,
                prompt,
                max_tokens=cfg.max_tokens,
                temperature=cfg.sampled_temperature,
                seed=ctx.seed * 1000 + index,
                n=cfg.sampled_per_probe,
            )
            return Answer(served.text, served.finish_reason), [Answer(s.text, s.finish_reason) for s in samples]

        per_probe = ctx.map(answers, enumerate(probes))
        greedy = [first for first, _ in per_probe]
        sampled = [answer for _, samples in per_probe for answer in samples]
        return Measurement(
            values={
                "compliance_greedy": pass_rate(greedy, verifier),
                "compliance_sampled": pass_rate(sampled, verifier),
            },
            details={
                "greedy": [{"prompt": p, "answer": a.text, "pass": verifier(a)} for p, a in zip(probes, greedy)],
                "sampled": [{"answer": a.text, "pass": verifier(a)} for a in sampled],
            },
        )
