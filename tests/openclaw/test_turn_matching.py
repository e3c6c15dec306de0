"""Feedback from a chat client that wraps turns (OpenClaw) finds the completion that was served: the user's words
inside OpenClaw's envelope, the answer with OpenClaw's truncation notice appended. The strings are the ones
OpenClaw 2026.9.6 sent and showed (measured); nothing looser matches."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from claas.auth import OPEN_SCOPE
from claas.core.types import FeedbackItem
from claas.errors import UnprocessableError
from claas.feedback import resolve_example
from claas.inference.cache import CachedCompletion, CompletionCache
from claas.inference.turns import served_answer_candidates, user_turn_matches

WORDS = "What is the capital of France?"
SENT_USER = (
    f"[Tue 2026-12-01 23:30 UTC] {WORDS}\n\nRuntime: agent=main | session=agent:main:openai:e0b8f57d | host=vm | "
    "os=Linux (x64) | node=v24.19.0 | model=claas/alice/assistant | channel=webchat"
)
SERVED = "@will_strike\nRe (17mionsa) II returns\n\n<<[\""
NOTICE = "⚠️ Reply truncated at the model's output token limit. The text above is partial — ask to continue it."
SHOWN = f"{SERVED}\n\n{NOTICE}"


class Adapters:
    async def lora_exists(self, lora_id: str) -> bool:
        return lora_id == "alice/assistant"


def _cache_with(user: str = SENT_USER, text: str = SERVED) -> CompletionCache:
    cache = CompletionCache(16, 3600.0)
    messages = [{"role": "system", "content": "You are a personal assistant running inside OpenClaw."},
                {"role": "user", "content": user}]
    cache.put(CachedCompletion("chatcmpl-1", "alice/assistant", messages, [1, 2], [3, 4], [-0.5, -0.25], text, text))
    return cache


def _resolve(cache: CompletionCache, **fields: Any) -> Any:
    item = FeedbackItem.model_validate(
        {"lora_id": "alice/assistant", "prompt": WORDS, "response": SHOWN, "feedback": "Answer the question.", **fields}
    )
    engine: Any = Adapters()
    return asyncio.run(resolve_example(item, cache, OPEN_SCOPE, engine))


def test_words_inside_the_envelope_and_the_answer_under_the_notice_hit_the_cache() -> None:
    example = _resolve(_cache_with())
    assert example.source == "cache" and example.completion_id == "chatcmpl-1"
    assert example.response_text == SERVED  # trained on what was served, not on the notice
    assert example.messages[1]["content"] == SENT_USER  # and on the conversation as the server saw it


def test_the_same_with_the_completion_id() -> None:
    example = _resolve(_cache_with(), completion_id="chatcmpl-1")
    assert example.source == "cache" and example.rollout_logprobs == [-0.5, -0.25]


def test_content_parts_are_the_same_words() -> None:
    parts = [{"role": "user", "content": [{"type": "text", "text": WORDS}]}]
    assert _resolve(_cache_with(), prompt=parts).source == "cache"


def test_another_question_or_another_answer_does_not_match() -> None:
    cache = _cache_with()
    assert _resolve(cache, prompt="What is the capital of Spain?").source == "tokenized"
    assert _resolve(cache, response=f"Lyon.\n\n{NOTICE}").source == "tokenized"
    with pytest.raises(UnprocessableError) as err:
        _resolve(cache, completion_id="chatcmpl-1", prompt="What is the capital of Spain?")
    assert err.value.param == "prompt"


@pytest.mark.parametrize(
    ("sent", "served", "expected"),
    [
        (WORDS, SENT_USER, True),
        (WORDS, f"[Telegram Alice (@alice) id:42 2026-12-01 23:30 UTC] {WORDS}", True),
        (WORDS, f"{WORDS}\n\nConversation info: webchat", True),  # context appended after the words
        (f"Line one.\n\n{WORDS}", f"[ts] Line one.\n\n{WORDS}\n\nRuntime: x", True),  # several paragraphs
        ("hi", "Summarise this: hi, what is the capital of France? Thanks", False),  # a phrase is not the turn
        ("hi", "Summarise this:\n\nhi\n\nThanks", False),  # nor a paragraph in the middle without an envelope
        ("hi", "[ts] hi there", False),  # the envelope's words are the whole paragraph
        (WORDS, f"Context first.\n\n{WORDS}", False),
        ("", "", True),
        ("", "something", False),
    ],
)
def test_user_turn_rules(sent: str, served: str, expected: bool) -> None:
    assert user_turn_matches(sent, served) is expected


def test_answer_candidates_drop_trailing_paragraphs_longest_first() -> None:
    assert served_answer_candidates(SHOWN) == [SHOWN, SERVED, "@will_strike\nRe (17mionsa) II returns"]
    assert served_answer_candidates("One paragraph.") == ["One paragraph."]
