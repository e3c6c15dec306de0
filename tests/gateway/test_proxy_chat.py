"""The gateway as a real uvicorn server in front of the real model server (SmolLM2 on CPU), driven with the official
`openai` client: answers equal the server's own (greedy), streams are relayed as they are produced, the cache holds
the server's exact token ids and logprobs, errors come back in OpenAI's shape."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

pytestmark = pytest.mark.slow

MESSAGES = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
GREEDY = {"temperature": 0, "max_tokens": 16}


@pytest.fixture(scope="module")
def clients(live_gateway):
    """(through the gateway, direct to the server) openai clients."""
    via = openai.OpenAI(base_url=f"{live_gateway.base_url}/v1", api_key="unused", max_retries=0, timeout=120)
    direct = openai.OpenAI(base_url=f"{live_gateway.upstream_url}/v1", api_key="unused", max_retries=0, timeout=120)
    yield via, direct
    via.close()
    direct.close()


def test_chat_equals_direct_and_hides_what_was_not_asked(live_gateway, clients):
    via, direct = clients
    raw = via.chat.completions.with_raw_response.create(model=live_gateway.model, messages=MESSAGES, **GREEDY)
    reply = raw.parse()
    expected = direct.chat.completions.create(model=live_gateway.model, messages=MESSAGES, **GREEDY)
    assert reply.choices[0].message.content == expected.choices[0].message.content
    assert reply.choices[0].message.content
    assert raw.headers["x-claas-completion-id"] == reply.id
    assert reply.choices[0].logprobs is None
    assert (reply.choices[0].model_extra or {}).get("token_ids") is None
    assert (reply.model_extra or {}).get("prompt_token_ids") is None


def test_stream_equals_direct(live_gateway, clients):
    via, direct = clients
    stream = via.chat.completions.create(model=live_gateway.model, messages=MESSAGES, stream=True, **GREEDY)
    chunks = list(stream)
    expected = direct.chat.completions.create(model=live_gateway.model, messages=MESSAGES, **GREEDY)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == (
        expected.choices[0].message.content
    )
    assert all(c.choices[0].logprobs is None for c in chunks if c.choices)
    assert all((c.choices[0].model_extra or {}).get("token_ids") is None for c in chunks if c.choices)
    entry = live_gateway.app.state.cache.get(chunks[0].id)
    assert entry is not None and entry.visible_text == expected.choices[0].message.content


def test_logprobs_and_token_ids_when_asked_equal_the_servers(live_gateway, clients):
    via, direct = clients
    kwargs = dict(model=live_gateway.model, messages=MESSAGES, logprobs=True, top_logprobs=2, **GREEDY)
    reply = via.chat.completions.create(extra_body={"return_token_ids": True}, **kwargs)
    expected = direct.chat.completions.create(extra_body={"return_token_ids": True}, **kwargs)
    assert reply.choices[0].model_extra["token_ids"] == expected.choices[0].model_extra["token_ids"]
    assert reply.model_extra["prompt_token_ids"] == expected.model_extra["prompt_token_ids"]
    got = [item.logprob for item in reply.choices[0].logprobs.content]
    want = [item.logprob for item in expected.choices[0].logprobs.content]
    assert got == pytest.approx(want, abs=1e-5)
    assert len(reply.choices[0].logprobs.content[0].top_logprobs) == 2


@pytest.mark.parametrize("stream", [False, True])
def test_cache_holds_the_servers_exact_ids_and_logprobs(live_gateway, clients, stream):
    via, direct = clients
    messages = [{"role": "user", "content": f"Name one colour (stream={stream})."}]
    if stream:
        chunks = list(via.chat.completions.create(model=live_gateway.model, messages=messages, stream=True, **GREEDY))
        entry = live_gateway.app.state.cache.get(chunks[0].id)  # written before [DONE] reached us
    else:
        reply = via.chat.completions.create(model=live_gateway.model, messages=messages, **GREEDY)
        entry = live_gateway.app.state.cache.get(reply.id)
    expected = direct.chat.completions.create(
        model=live_gateway.model, messages=messages, logprobs=True, extra_body={"return_token_ids": True}, **GREEDY
    )
    assert entry is not None
    assert entry.model == live_gateway.model and entry.messages == messages
    assert entry.prompt_token_ids == expected.model_extra["prompt_token_ids"]
    assert entry.response_token_ids == expected.choices[0].model_extra["token_ids"]
    assert entry.response_logprobs == pytest.approx([i.logprob for i in expected.choices[0].logprobs.content], abs=1e-5)
    assert entry.response_text == expected.choices[0].message.content


def test_stream_delivers_the_first_chunk_well_before_the_last(live_gateway, clients):
    via, _ = clients
    start = time.monotonic()
    arrivals = []
    stream = via.chat.completions.create(
        model=live_gateway.model,
        messages=[{"role": "user", "content": "Write a short poem about the sea."}],
        stream=True,
        temperature=0,
        max_tokens=48,
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append(time.monotonic())
    assert len(arrivals) >= 10
    first, last = arrivals[0], arrivals[-1]
    # buffered relays deliver everything at once (last - first ~ 0); a true stream spreads chunks over generation
    assert last - first > 0.25 * (last - start)
    assert sorted(arrivals) == arrivals


def test_completions_equal_direct_and_are_cached(live_gateway, clients):
    via, direct = clients
    kwargs = dict(model=live_gateway.model, prompt="The capital of France is", temperature=0, max_tokens=8)
    reply = via.completions.create(**kwargs)
    expected = direct.completions.create(logprobs=1, extra_body={"return_token_ids": True}, **kwargs)
    assert reply.choices[0].text == expected.choices[0].text
    assert reply.choices[0].logprobs is None
    entry = live_gateway.app.state.cache.get(reply.id)
    assert entry.response_token_ids == expected.choices[0].model_extra["token_ids"]
    assert entry.prompt_token_ids == expected.choices[0].model_extra["prompt_token_ids"]
    assert entry.messages == [{"role": "user", "content": "The capital of France is"}]


def test_models_lists_the_base_model(live_gateway, clients):
    via, _ = clients
    assert live_gateway.model in [card.id for card in via.models.list()]


def test_score_equals_the_servers_prompt_logprobs(live_gateway, clients):
    _, direct = clients
    completion = "Paris is the capital of France."
    body = httpx.post(
        f"{live_gateway.base_url}/v1/score",
        json={"model": live_gateway.model, "messages": MESSAGES, "completion": completion},
        timeout=120,
    ).json()
    prompt_ids = httpx.post(
        f"{live_gateway.upstream_url}/tokenize",
        json={"model": live_gateway.model, "messages": MESSAGES, "add_generation_prompt": True},
    ).json()["tokens"]
    assert body["prompt_token_count"] == len(prompt_ids)
    ids = prompt_ids + body["token_ids"]
    expected = direct.completions.create(
        model=live_gateway.model, prompt=ids, max_tokens=1, temperature=0, extra_body={"prompt_logprobs": 0}
    )
    positions = expected.choices[0].model_extra["prompt_logprobs"]
    want = [positions[len(prompt_ids) + i][str(t)]["logprob"] for i, t in enumerate(body["token_ids"])]
    assert body["logprobs"] == pytest.approx(want, abs=1e-4)
    assert "".join(body["tokens"]).strip() == completion
    assert body["sum_logprob"] == pytest.approx(sum(want), abs=1e-3)


def test_unloaded_adapter_known_to_the_engine_is_loaded_on_first_use(live_gateway, clients, lora_adapter_dir):
    via, direct = clients
    name = "gateway-test/adapter"
    live_gateway.engine.adapters[name] = str(lora_adapter_dir)
    try:
        reply = via.chat.completions.create(model=name, messages=MESSAGES, **GREEDY)
        expected = direct.chat.completions.create(model=name, messages=MESSAGES, **GREEDY)
        assert reply.choices[0].message.content == expected.choices[0].message.content
        assert live_gateway.app.state.cache.get(reply.id).model == name
    finally:
        live_gateway.engine.adapters.pop(name, None)
        httpx.post(f"{live_gateway.upstream_url}/v1/unload_lora_adapter", json={"lora_name": name})


def test_validation_error_is_400_in_openai_shape(live_gateway, clients):
    via, _ = clients
    with pytest.raises(openai.BadRequestError) as info:
        via.chat.completions.create(model=live_gateway.model, messages=[], max_tokens=4)
    error = info.value.response.json()["error"]
    assert error["code"] == 400 and error["param"] == "messages" and error["type"] == "invalid_request_error"


def test_unknown_model_is_404(live_gateway, clients):
    via, _ = clients
    with pytest.raises(openai.NotFoundError):
        via.chat.completions.create(model="no-such/model", messages=MESSAGES, max_tokens=4)
