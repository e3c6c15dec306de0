"""CompletionCache: LRU bound, TTL on an injected clock, the two keys (id, normalized text), hit/miss counting."""

from __future__ import annotations

import pytest

from claas.inference.cache import CachedCompletion, CompletionCache, entry_bytes


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def entry(completion_id: str, text: str = "an answer", *, model: str = "base", visible: str | None = None):
    return CachedCompletion(
        completion_id=completion_id,
        model=model,
        messages=[{"role": "user", "content": "q"}],
        prompt_token_ids=[1, 2, 3],
        response_token_ids=[7, 8],
        response_logprobs=[-0.5, -0.25],
        response_text=text,
        visible_text=text if visible is None else visible,
    )


def cid(found: CachedCompletion | None) -> str | None:
    return found.completion_id if found is not None else None


def test_get_returns_what_was_put_and_counts_hits_and_misses():
    lookups: list[bool] = []
    cache = CompletionCache(8, 60, on_lookup=lookups.append)
    cache.put(entry("a"))
    got = cache.get("a")
    assert got is not None and got.response_token_ids == [7, 8]
    assert cache.get("nope") is None
    assert (cache.hits, cache.misses) == (1, 1)
    assert lookups == [True, False]


def test_lru_evicts_the_least_recently_used():
    cache = CompletionCache(2, 60)
    cache.put(entry("a", "first"))
    cache.put(entry("b", "second"))
    assert cache.get("a") is not None  # a is now the most recent
    cache.put(entry("c", "third"))
    assert len(cache) == 2
    assert cache.get("b") is None
    assert cache.find("second") is None  # the text index forgets evicted entries too
    assert cache.get("a") is not None and cache.get("c") is not None


def test_ttl_expires_entries_on_the_injected_clock():
    clock = FakeClock()
    cache = CompletionCache(8, ttl_s=10, clock=clock)
    cache.put(entry("a", "hello"))
    clock.now += 9.9
    assert cache.get("a") is not None
    clock.now += 0.2
    assert cache.get("a") is None
    assert cache.find("hello") is None
    assert len(cache) == 0


def test_put_drops_expired_entries_at_the_head():
    clock = FakeClock()
    cache = CompletionCache(8, ttl_s=10, clock=clock)
    cache.put(entry("old"))
    clock.now += 11
    cache.put(entry("new", "other text"))
    assert len(cache) == 1


def test_find_by_normalized_text_ignores_whitespace_and_think_blocks():
    cache = CompletionCache(8, 60)
    cache.put(entry("a", "<think>\nlet me think\n</think>\n\nThe  answer\nis 42. "))
    assert cid(cache.find("The answer is 42.")) == "a"
    assert cid(cache.find("  The answer   is 42.\n")) == "a"
    assert cid(cache.find("<think>other reasoning</think>The answer is 42.")) == "a"
    assert cache.find("The answer is 43.") is None


def test_find_matches_visible_or_full_text_and_filters_by_model():
    cache = CompletionCache(8, 60)
    cache.put(entry("a", "full text <think>x</think> tail", visible="what the client saw", model="alice/a"))
    assert cid(cache.find("what the client saw")) == "a"
    assert cid(cache.find("full text tail")) == "a"
    assert cache.find("what the client saw", model="alice/a") is not None
    assert cache.find("what the client saw", model="bob/b") is None


def test_find_prefers_the_most_recent_identical_answer():
    cache = CompletionCache(8, 60)
    cache.put(entry("first", "same words"))
    cache.put(entry("second", "same words"))
    assert cid(cache.find("same words")) == "second"
    cache.get("first")  # recency of use does not matter: the most recently served answer wins
    assert cid(cache.find("same words")) == "second"


def test_put_same_id_replaces_the_entry_and_its_text_key():
    cache = CompletionCache(8, 60)
    cache.put(entry("a", "old text"))
    cache.put(entry("a", "new text"))
    assert len(cache) == 1
    assert cache.find("old text") is None
    assert cid(cache.find("new text")) == "a"


@pytest.mark.parametrize("size, ttl", [(0, 1), (1, 0)])
def test_bad_bounds_are_rejected(size, ttl):
    with pytest.raises(ValueError):
        CompletionCache(size, ttl)


def _long(completion_id: str, tokens: int) -> CachedCompletion:
    return CachedCompletion(
        completion_id=completion_id,
        model="base",
        messages=[{"role": "user", "content": "q"}],
        prompt_token_ids=[1] * tokens,
        response_token_ids=[2] * tokens,
        response_logprobs=[-0.5] * tokens,
        response_text=f"answer {completion_id}",
        visible_text=f"answer {completion_id}",
    )


def test_the_byte_bound_evicts_by_size_not_by_count():
    """A few huge completions cannot take the room of many small ones: the cache holds at most `max_bytes`
    (estimated), evicting the least recently used, and one entry larger than the bound is not kept at all."""
    one = entry_bytes(_long("probe", 10_000))
    cache = CompletionCache(1000, 60, max_bytes=3 * one)
    for index in range(5):
        cache.put(_long(f"big{index}", 10_000))
    assert len(cache) == 3 and cache.bytes <= cache.max_bytes
    assert cache.get("big0") is None and cache.get("big1") is None  # the oldest went first
    assert cache.find("answer big0") is None  # and the text index forgot them
    assert cid(cache.find("answer big4")) == "big4"
    cache.put(_long("huge", 40_000))  # alone larger than the bound
    assert cache.get("huge") is None and len(cache) == 3
    for index in range(50):
        cache.put(entry(f"small{index}", f"small answer {index}"))
    assert len(cache) == 50 + 2 and cache.bytes <= cache.max_bytes  # small ones push out the big ones only as needed
