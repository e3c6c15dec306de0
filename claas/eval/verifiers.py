"""Verifiers: does one answer follow a preference? Each is a callable `(answer) -> bool`, built by Hydra from a
preference's `verifier` block (`_target_` + arguments)."""

from __future__ import annotations

import re
from dataclasses import dataclass

import emoji

_SENTENCE_END = re.compile(r"[.!?]+(?=\s|$)")


@dataclass(frozen=True)
class Answer:
    text: str
    finish_reason: str | None = "stop"


@dataclass(frozen=True)
class MentionsName:
    """The answer names the assistant `name` (a whole word, any case)."""

    name: str

    def __call__(self, answer: Answer) -> bool:
        return re.search(rf"\b{re.escape(self.name)}\b", answer.text, flags=re.IGNORECASE) is not None


def count_sentences(text: str) -> int:
    """Sentences ended by . ! or ? (runs like '?!' count once); trailing text without an end mark counts too."""
    stripped = text.strip()
    if not stripped:
        return 0
    ends = list(_SENTENCE_END.finditer(stripped))
    trailing = stripped[ends[-1].end() :].strip() if ends else stripped
    return len(ends) + (1 if trailing else 0)


@dataclass(frozen=True)
class AtMostSentences:
    """At most `max_sentences` sentences, and the answer ended by itself (a reply cut off by the token budget is
    not concise: it only looks short)."""

    max_sentences: int

    def __call__(self, answer: Answer) -> bool:
        return answer.finish_reason != "length" and count_sentences(answer.text) <= self.max_sentences


@dataclass(frozen=True)
class NoEmoji:
    """Not a single emoji (per the Unicode emoji list of the `emoji` package)."""

    def __call__(self, answer: Answer) -> bool:
        return emoji.emoji_count(answer.text) == 0
