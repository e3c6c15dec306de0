"""How a chat client's view of a turn relates to what the inference server was sent and produced.

Chat front-ends do not send the user's words alone, nor show the model's answer alone. Measured with OpenClaw
2026.9.6: the user turn sent upstream is `[Tue 2026-12-01 23:30 UTC] <the user's words>\\n\\nRuntime: agent=main |
...` (an envelope tag before the words, the run's dynamic context appended as a paragraph), and when an answer hits
the token limit the text shown to the user is the served answer followed by a paragraph `⚠️ Reply truncated at the
model's output token limit. ...`. Feedback sent from such a client carries the words and the shown answer, so
matching it to the served completion by exact equality misses.

The rules here accept exactly those wrappings and nothing looser:

- user turn: equal after whitespace normalization, or the feedback's paragraphs are a run of the served turn's
  paragraphs that starts the turn or starts right after an envelope tag (`[...]` at the start of a paragraph);
  a phrase inside a paragraph ("hi" in "Summarise this: hi, ...") never matches.
- answer: the served answer is the shown text, or the shown text with whole trailing paragraphs removed (notices a
  client appended); the longest such prefix is tried first.

Pure functions on strings; the cache lookup and access rules stay in `claas.feedback`.
"""

from __future__ import annotations

import re

from claas.inference.helpers import normalize_text

_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")
# An envelope tag as chat bridges put it before the user's words: "[Tue 2026-12-01 23:30 UTC] ",
# "[Telegram Alice (@alice) id:42 2026-12-01 23:30 UTC] ". One line, bounded length.
_ENVELOPE_TAG = re.compile(r"^\[[^\[\]\n]{1,200}\][ \t]*")


def paragraphs(text: str) -> list[str]:
    """Blank-line separated paragraphs, each whitespace-normalized; empty ones dropped."""
    parts = (" ".join(part.split()) for part in _PARAGRAPH_BREAK.split(text.strip()))
    return [part for part in parts if part]


def user_turn_matches(sent: str, served: str) -> bool:
    """Is `sent` (the user's words as a feedback gives them) the user turn `served` as the server saw it?"""
    want, have = normalize_text(sent), normalize_text(served)
    if want == have:
        return True
    if not want:
        return False
    sent_parts, served_parts = paragraphs(sent), paragraphs(served)
    width = len(sent_parts)
    for start in range(len(served_parts) - width + 1):
        window = served_parts[start : start + width]
        untagged = _ENVELOPE_TAG.sub("", window[0], count=1)
        if untagged != window[0] and [untagged.strip(), *window[1:]] == sent_parts:
            return True  # the words right after an envelope tag
        if start == 0 and window == sent_parts:
            return True  # the words first, context appended after them
    return False


def served_answer_candidates(shown: str) -> list[str]:
    """Texts the served answer may have been, longest first: `shown` itself, then `shown` without 1, 2, ...
    trailing paragraphs (a notice the client appended). Never empty for a non-empty `shown`."""
    pieces = _PARAGRAPH_BREAK.split(shown.strip())
    candidates = [shown]
    for end in range(len(pieces) - 1, 0, -1):
        prefix = "\n\n".join(pieces[:end])
        if normalize_text(prefix):
            candidates.append(prefix)
    return candidates
