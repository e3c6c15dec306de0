"""Capability probes: does the adapter still know what the base knew? Factual questions with known answers, a small
coding task whose code is run against tests in a subprocess with a timeout, and an instruction-following check.
`capability` is the pass rate over all of them; a drop against the baseline is forgetting."""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from pathlib import Path

from claas.eval.metrics.base import MeasureContext, Measurement, Metric, register

_FENCE = re.compile(r"```(?:[a-zA-Z0-9_+-]*)\n(.*?)(?:```|\Z)", re.DOTALL)


def answer_matches(answer: str, pattern: str) -> bool:
    """`pattern` is a regex searched case-insensitively in the answer."""
    return re.search(pattern, answer, flags=re.IGNORECASE) is not None


def extract_code(answer: str) -> str:
    """The first fenced code block, or (no fence) the answer from its first `def`/`import` line on."""
    fenced = _FENCE.search(answer)
    if fenced:
        return fenced.group(1)
    lines = answer.splitlines()
    for index, line in enumerate(lines):
        if line.lstrip().startswith(("def ", "import ", "from ")):
            return "\n".join(lines[index:])
    return answer


def code_passes(code: str, tests: str, timeout_s: float) -> bool:
    """Run `code` then `tests` in a fresh interpreter (isolated mode, a temporary working directory); True when it
    exits 0 within the timeout."""
    with tempfile.TemporaryDirectory(prefix="claas-eval-code-") as workdir:
        script = Path(workdir) / "candidate.py"
        script.write_text(code + "\n\n" + tests + "\n")
        try:
            result = subprocess.run(
                [sys.executable, "-I", str(script)], cwd=workdir, capture_output=True, timeout=timeout_s
            )
        except subprocess.TimeoutExpired:
            return False
    return result.returncode == 0


def follows_one_word(answer: str, expected: str, max_words: int) -> bool:
    words = re.findall(r"[\w'-]+", answer)
    return 0 < len(words) <= max_words and any(word.lower() == expected.lower() for word in words)


@register
class CapabilityMetric(Metric):
    name = "capability"
    slow = True

    def measure(self, ctx: MeasureContext) -> Measurement:
        cap = ctx.config.capability
        max_tokens = ctx.config.measure.max_tokens

        def ask(question: tuple[str, int]) -> str:
            prompt, tokens = question
            return ctx.client.chat(ctx.model, prompt, max_tokens=tokens, temperature=0.0)[0].text

        facts = cap.facts[: cap.limit] if cap.limit else cap.facts
        questions = [(fact.prompt, max_tokens) for fact in facts]
        questions += [(cap.coding.prompt, max(max_tokens, 96)), (cap.instruction.prompt, 16)]
        *fact_answers, code_answer, instruction_answer = ctx.map(ask, questions)
        fact_results = [(fact.prompt, answer) for fact, answer in zip(facts, fact_answers)]
        fact_pass = [answer_matches(answer, fact.answer) for fact, answer in zip(facts, fact_answers)]
        coding_pass = code_passes(extract_code(code_answer), cap.coding.tests, cap.coding.timeout_s)
        instruction_pass = follows_one_word(instruction_answer, cap.instruction.answer, cap.instruction.max_words)
        checks = [*fact_pass, coding_pass, instruction_pass]
        return Measurement(
            values={
                "capability": sum(checks) / len(checks),
                "capability_facts": sum(fact_pass) / len(fact_pass) if fact_pass else 0.0,
                "capability_coding": float(coding_pass),
                "capability_instruction": float(instruction_pass),
            },
            details={
                "facts": [{"prompt": p, "answer": a, "pass": ok} for (p, a), ok in zip(fact_results, fact_pass)],
                "coding": {"answer": code_answer, "pass": coding_pass},
                "instruction": {"answer": instruction_answer, "pass": instruction_pass},
            },
        )
