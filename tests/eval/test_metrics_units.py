"""The eval metrics' pure parts on fixed inputs: verifiers, margin, pass rate, code checks, entropy, self-ROUGE."""

from __future__ import annotations

import math

import pytest

from claas.eval.metrics import METRICS, get_metric
from claas.eval.metrics.capability import answer_matches, code_passes, extract_code, follows_one_word
from claas.eval.metrics.collapse import mean_token_entropy, self_rouge_l, topk_entropy
from claas.eval.metrics.compliance import pass_rate
from claas.eval.metrics.margin import logprob_margin
from claas.eval.verifiers import Answer, AtMostSentences, MentionsName, NoEmoji, count_sentences


def test_registry_holds_the_four_metrics_and_refuses_unknown_names() -> None:
    assert set(METRICS) == {"margin", "compliance", "capability", "collapse"}
    assert get_metric("margin").name == "margin"
    with pytest.raises(ValueError, match="unknown metric 'nope'"):
        get_metric("nope")


def test_mentions_name_is_a_whole_word_any_case() -> None:
    verifier = MentionsName("Kuro")
    assert verifier(Answer("Hi, I'm KURO, your assistant."))
    assert verifier(Answer("kuro here"))
    assert not verifier(Answer("I'm Kurosawa's fan"))
    assert not verifier(Answer("I'm SmolLM."))


@pytest.mark.parametrize(
    ("text", "count"),
    [("", 0), ("One.", 1), ("One. Two! Three?", 3), ("Wait?! Really.", 2), ("No end mark", 1), ("A. B. and c", 3),
     ("Pi is 3.14 today.", 1)],
)
def test_count_sentences(text: str, count: int) -> None:
    assert count_sentences(text) == count


def test_at_most_sentences_rejects_long_and_truncated_answers() -> None:
    verifier = AtMostSentences(3)
    assert verifier(Answer("One. Two. Three.", "stop"))
    assert not verifier(Answer("One. Two. Three. Four.", "stop"))
    assert not verifier(Answer("One. Two", "length"))  # cut by max_tokens: it only looks short


def test_no_emoji() -> None:
    assert NoEmoji()(Answer("Congratulations on your promotion!"))
    assert not NoEmoji()(Answer("Congratulations 🎉"))
    assert not NoEmoji()(Answer("Well done ✨"))


def test_logprob_margin_is_the_mean_difference() -> None:
    assert logprob_margin([-3.0, -10.0], [-5.0, -11.0]) == pytest.approx(1.5)
    with pytest.raises(ValueError):
        logprob_margin([-1.0], [])
    with pytest.raises(ValueError):
        logprob_margin([], [])


def test_pass_rate() -> None:
    answers = [Answer("I'm Kuro"), Answer("I'm SmolLM"), Answer("Kuro!"), Answer("hello")]
    assert pass_rate(answers, MentionsName("Kuro")) == 0.5
    with pytest.raises(ValueError):
        pass_rate([], MentionsName("Kuro"))


def test_answer_matches_is_a_case_insensitive_regex() -> None:
    assert answer_matches("The capital is PARIS.", "paris")
    assert answer_matches("There are 7 days.", r"\b(7|seven)\b")
    assert not answer_matches("There are 17 days.", r"\b(7|seven)\b")


def test_extract_code_prefers_a_fence_then_the_first_def() -> None:
    fenced = "Here you go:\n```python\ndef add(a, b):\n    return a + b\n```\nEnjoy!"
    assert extract_code(fenced) == "def add(a, b):\n    return a + b\n"
    bare = "Sure.\ndef add(a, b):\n    return a + b"
    assert extract_code(bare) == "def add(a, b):\n    return a + b"
    unterminated = "```\ndef add(a, b):\n    return a + b"
    assert extract_code(unterminated).startswith("def add")


def test_code_passes_runs_the_tests_in_a_subprocess_with_a_timeout() -> None:
    tests = "assert add(2, 3) == 5"
    assert code_passes("def add(a, b):\n    return a + b", tests, timeout_s=10)
    assert not code_passes("def add(a, b):\n    return a - b", tests, timeout_s=10)
    assert not code_passes("def add(a, b) return", tests, timeout_s=10)  # syntax error
    assert not code_passes("import time\ntime.sleep(30)\ndef add(a, b):\n    return a + b", tests, timeout_s=1)


def test_follows_one_word() -> None:
    assert follows_one_word("Green.", "green", 3)
    assert follows_one_word("Grass is green", "green", 3)
    assert not follows_one_word("Grass is usually a lovely green", "green", 3)
    assert not follows_one_word("Blue", "green", 3)
    assert not follows_one_word("", "green", 3)


def test_topk_entropy_with_tail_bucket() -> None:
    assert topk_entropy([0.0]) == pytest.approx(0.0)  # all mass on one token
    two = [math.log(0.5), math.log(0.5)]
    assert topk_entropy(two) == pytest.approx(math.log(2))
    # top-1 of 0.5 and a tail bucket holding the other 0.5: the same two-outcome entropy
    assert topk_entropy([math.log(0.5)]) == pytest.approx(math.log(2))
    assert mean_token_entropy([[0.0], two, []]) == pytest.approx(math.log(2) / 2)
    with pytest.raises(ValueError):
        mean_token_entropy([[], []])


def test_self_rouge_l() -> None:
    assert self_rouge_l(["the cat sat", "the cat sat"]) == pytest.approx(1.0)
    assert self_rouge_l(["the cat sat", "a dog ran"]) == pytest.approx(0.0)
    mixed = self_rouge_l(["the cat sat on the mat", "the cat sat", "dogs bark loudly"])
    assert 0.0 < mixed < 1.0
    with pytest.raises(ValueError):
        self_rouge_l(["alone"])
