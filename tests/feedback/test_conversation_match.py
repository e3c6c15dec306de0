"""Which cached completion a feedback trains on (issue 8, finding 7): the exact conversation, the caller's own scope,
never another adapter's answer; a `completion_id` must match the adapter, the scope and the text sent."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from claas.auth import OPEN_SCOPE, AuthScope
from claas.core.types import FeedbackItem
from claas.errors import NotFoundError, UnprocessableError
from claas.feedback import resolve_example
from claas.inference.cache import CachedCompletion, CompletionCache

ALICE = AuthScope(prefix="alice", authenticated=True)
BOB = AuthScope(prefix="bob", authenticated=True)
ANSWER = "Paris is the capital of France."


class Adapters:
    """The one engine method resolution uses (which model names are adapters), over a fixed set."""

    def __init__(self, *ids: str) -> None:
        self.ids = set(ids)

    async def lora_exists(self, lora_id: str) -> bool:
        return lora_id in self.ids


def _entry(completion_id: str, model: str, user: str, *, owner: str | None = None, system: str | None = None,
           text: str = ANSWER) -> CachedCompletion:
    messages: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": user})
    return CachedCompletion(completion_id, model, messages, [1, 2, 3], [4, 5], [-0.1, -0.2], text, text, owner=owner)


def _resolve(cache: CompletionCache, scope: AuthScope = OPEN_SCOPE, **fields: Any) -> Any:
    item = FeedbackItem.model_validate({"lora_id": "alice/a", "prompt": "What is the capital of France?",
                                        "response": ANSWER, "feedback": "Be brief.", **fields})
    engine: Any = Adapters("alice/a", "bob/b")
    return asyncio.run(resolve_example(item, cache, scope, engine))


@pytest.fixture
def cache() -> CompletionCache:
    return CompletionCache(64, 3600.0)


def test_prompt_must_be_the_exact_last_user_turn(cache: CompletionCache) -> None:
    cache.put(_entry("c1", "alice/a", "Summarise this: hi, what is the capital of France? Thanks"))
    assert _resolve(cache, prompt="hi").source == "tokenized"  # a substring is not the conversation
    assert _resolve(cache).source == "tokenized"
    assert _resolve(cache, prompt=[{"role": "assistant", "content": "x"}]).source == "tokenized"  # no user turn
    cache.put(_entry("c2", "alice/a", "What is   the capital of France?"))
    example = _resolve(cache)  # whitespace-normalized equality
    assert example.source == "cache" and example.completion_id == "c2"


def test_system_prompt_must_match_when_given(cache: CompletionCache) -> None:
    cache.put(_entry("c1", "alice/a", "What is the capital of France?", system="You are a pirate."))
    assert _resolve(cache, system_prompt="You are a lawyer.").source == "tokenized"
    assert _resolve(cache, system_prompt="You are a pirate.").completion_id == "c1"
    assert _resolve(cache).completion_id == "c1"  # not given: the user turn decides


def test_never_another_adapters_or_another_scopes_completion(cache: CompletionCache) -> None:
    cache.put(_entry("bob-own", "bob/b", "What is the capital of France?", owner="bob"))
    assert _resolve(cache, ALICE).source == "tokenized"
    assert _resolve(cache, OPEN_SCOPE).source == "tokenized"  # an admin's feedback on alice/a neither
    cache.put(_entry("bob-base", "smollm2-135m", "What is the capital of France?", owner="bob"))
    assert _resolve(cache, ALICE).source == "tokenized"  # bob's base-model conversation is bob's
    cache.put(_entry("alice-base", "smollm2-135m", "What is the capital of France?", owner="alice"))
    assert _resolve(cache, ALICE).completion_id == "alice-base"
    cache.put(_entry("alice-own", "alice/a", "What is the capital of France?", owner=None))
    assert _resolve(cache, ALICE).completion_id == "alice-own"  # served by the adapter itself: preferred


def test_completion_id_is_checked_against_scope_adapter_and_text(cache: CompletionCache) -> None:
    cache.put(_entry("bob-own", "bob/b", "What is the capital of France?", owner="bob"))
    cache.put(_entry("bob-base", "smollm2-135m", "What is the capital of France?", owner="bob"))
    cache.put(_entry("alice-b", "bob/b", "What is the capital of France?", owner="alice"))
    cache.put(_entry("alice-own", "alice/a", "What is the capital of France?", owner="alice"))
    for other in ("bob-own", "bob-base"):
        with pytest.raises(NotFoundError) as err:
            _resolve(cache, ALICE, completion_id=other)
        assert err.value.param == "completion_id"
    with pytest.raises(UnprocessableError) as err:
        _resolve(cache, ALICE, completion_id="alice-b")  # alice's own request, but served by another adapter
    assert err.value.param == "completion_id" and "bob/b" in err.value.message
    with pytest.raises(UnprocessableError) as err:
        _resolve(cache, ALICE, completion_id="alice-own", response="Lyon is the capital of France.")
    assert err.value.param == "response"
    with pytest.raises(UnprocessableError) as err:
        _resolve(cache, ALICE, completion_id="alice-own", prompt="What is the capital of Spain?")
    assert err.value.param == "prompt"
    example = _resolve(cache, ALICE, completion_id="alice-own")
    assert example.source == "cache" and example.completion_id == "alice-own"
    assert example.prompt_token_ids == [1, 2, 3] and example.response_token_ids == [4, 5]
