"""The proxy against a scripted upstream (httpx MockTransport): what is asked upstream, what the client gets back,
what lands in the completion cache, adapter recovery, score, and the VllmClient's own parsing."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from claas.errors import NotFoundError, UpstreamError, UpstreamTimeoutError
from claas.inference.helpers import SseParser, sse_event
from claas.inference.vllm import VllmClient

MESSAGES = [{"role": "user", "content": "hi"}]
CHAT = {"model": "base", "messages": MESSAGES, "max_tokens": 4}
PROMPT_IDS = [1, 2, 3]


def chat_reply(texts=("<think>r</think>Hello!",), ids=((10, 11),), logprobs=((-0.1, -0.2),), model="base"):
    choices = []
    for index, (text, tids, lps) in enumerate(zip(texts, ids, logprobs)):
        choices.append(
            {
                "index": index,
                "message": {"role": "assistant", "content": text},
                "logprobs": {
                    "content": [
                        {"token": f"t{t}", "logprob": lp, "bytes": [], "top_logprobs": []} for t, lp in zip(tids, lps)
                    ]
                },
                "finish_reason": "stop",
                "token_ids": list(tids),
            }
        )
    return {
        "id": "chatcmpl-abc",
        "object": "chat.completion",
        "created": 1,
        "model": model,
        "choices": choices,
        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
        "prompt_token_ids": PROMPT_IDS,
    }


def chat_stream(pieces=("<thi", "nk>r</think>", "Hel", "lo!"), ids=((10,), (11, 12), (13,), (14,))):
    out = []
    for i, (piece, tids) in enumerate(zip(pieces, ids)):
        chunk = {
            "id": "chatcmpl-s",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": "base",
            "choices": [
                {
                    "index": 0,
                    "delta": {"content": piece},
                    "logprobs": {"content": [{"token": "x", "logprob": -0.5 * t, "top_logprobs": []} for t in tids]},
                    "finish_reason": "stop" if i == len(pieces) - 1 else None,
                    "token_ids": list(tids),
                }
            ],
        }
        if i == 0:
            chunk["prompt_token_ids"] = PROMPT_IDS
        out.append(sse_event(chunk))
    return b"".join(out) + b"data: [DONE]\n\n"


def sse_response(body: bytes):
    return lambda request: httpx.Response(200, content=body, headers={"content-type": "text/event-stream"})


def read_sse(text: str) -> list:
    parser = SseParser()
    events = parser.feed(text.encode())
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_chat_asks_for_ids_and_logprobs_strips_them_and_caches_them(make_gateway, fake_upstream):
    fake_upstream.on("POST", "/v1/chat/completions", lambda r: httpx.Response(200, json=chat_reply()))
    with make_gateway(fake_upstream) as (client, app):
        response = client.post("/v1/chat/completions", json={**CHAT, "top_k": 5})
        cache = app.state.cache
    assert response.status_code == 200
    assert response.headers["x-claas-completion-id"] == "chatcmpl-abc"
    sent = fake_upstream.bodies("/v1/chat/completions")[0]
    assert sent["logprobs"] is True and sent["return_token_ids"] is True and sent["top_k"] == 5  # extras pass
    body = response.json()
    choice = body["choices"][0]
    assert choice["logprobs"] is None and "token_ids" not in choice and "prompt_token_ids" not in body
    assert choice["message"]["content"] == "<think>r</think>Hello!"  # think kept by default
    entry = cache.get("chatcmpl-abc")
    assert entry.prompt_token_ids == PROMPT_IDS and entry.response_token_ids == [10, 11]
    assert entry.response_logprobs == [-0.1, -0.2] and entry.messages == MESSAGES and entry.model == "base"
    assert cache.find("Hello!") is entry


def test_chat_keeps_logprobs_and_ids_when_asked(make_gateway, fake_upstream):
    fake_upstream.on("POST", "/v1/chat/completions", lambda r: httpx.Response(200, json=chat_reply()))
    with make_gateway(fake_upstream) as (client, _):
        body = client.post("/v1/chat/completions", json={**CHAT, "logprobs": True, "return_token_ids": True}).json()
    assert body["choices"][0]["logprobs"]["content"][0]["logprob"] == -0.1
    assert body["choices"][0]["token_ids"] == [10, 11] and body["prompt_token_ids"] == PROMPT_IDS


@pytest.mark.parametrize("how", ["header", "body"])
def test_strip_thinking_changes_the_reply_not_the_cache(make_gateway, fake_upstream, how):
    fake_upstream.on("POST", "/v1/chat/completions", lambda r: httpx.Response(200, json=chat_reply()))
    with make_gateway(fake_upstream) as (client, app):
        if how == "header":
            response = client.post("/v1/chat/completions", json=CHAT, headers={"X-Claas-Strip-Thinking": "1"})
        else:
            response = client.post("/v1/chat/completions", json={**CHAT, "strip_thinking": True})
        entry = app.state.cache.get("chatcmpl-abc")
    assert response.json()["choices"][0]["message"]["content"] == "Hello!"
    assert "strip_thinking" not in fake_upstream.bodies("/v1/chat/completions")[0]
    assert entry.response_text == "<think>r</think>Hello!" and entry.visible_text == "Hello!"


def test_every_choice_is_cached_under_its_own_id(make_gateway, fake_upstream):
    reply = chat_reply(texts=("A", "B"), ids=((1,), (2,)), logprobs=((-1.0,), (-2.0,)))
    fake_upstream.on("POST", "/v1/chat/completions", lambda r: httpx.Response(200, json=reply))
    with make_gateway(fake_upstream) as (client, app):
        client.post("/v1/chat/completions", json={**CHAT, "n": 2})
        cache = app.state.cache
    assert cache.get("chatcmpl-abc").response_token_ids == [1]
    assert cache.get("chatcmpl-abc-1").response_token_ids == [2]


def test_stream_relays_chunks_strips_fields_and_caches_before_done(make_gateway, fake_upstream):
    fake_upstream.on("POST", "/v1/chat/completions", sse_response(chat_stream()))
    with make_gateway(fake_upstream) as (client, app):
        response = client.post("/v1/chat/completions", json={**CHAT, "stream": True})
        entry = app.state.cache.get("chatcmpl-s")
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["x-claas-completion-id"] == "chatcmpl-s"
    chunks = read_sse(response.text)
    assert len(chunks) == 4
    assert all("logprobs" not in c["choices"][0] and "token_ids" not in c["choices"][0] for c in chunks)
    assert "prompt_token_ids" not in chunks[0]
    assert "".join(c["choices"][0]["delta"]["content"] for c in chunks) == "<think>r</think>Hello!"
    assert entry.prompt_token_ids == PROMPT_IDS and entry.response_token_ids == [10, 11, 12, 13, 14]
    assert entry.response_logprobs == [-5.0, -5.5, -6.0, -6.5, -7.0]
    assert entry.response_text == "<think>r</think>Hello!"


def test_stream_with_ids_requested_and_thinking_stripped(make_gateway, fake_upstream):
    fake_upstream.on("POST", "/v1/chat/completions", sse_response(chat_stream()))
    with make_gateway(fake_upstream) as (client, app):
        payload = {**CHAT, "stream": True, "return_token_ids": True, "logprobs": True}
        response = client.post("/v1/chat/completions", json=payload, headers={"X-Claas-Strip-Thinking": "true"})
        entry = app.state.cache.get("chatcmpl-s")
    chunks = read_sse(response.text)
    assert "".join(c["choices"][0]["delta"]["content"] for c in chunks) == "Hello!"
    assert chunks[0]["prompt_token_ids"] == PROMPT_IDS
    assert [t for c in chunks for t in c["choices"][0]["token_ids"]] == [10, 11, 12, 13, 14]
    assert entry.visible_text == "Hello!" and entry.response_text == "<think>r</think>Hello!"


def test_stream_error_event_is_forwarded_and_nothing_cached(make_gateway, fake_upstream):
    body = chat_stream().replace(b"data: [DONE]\n\n", b"")
    first = body.split(b"\n\n")[0] + b"\n\n"
    error = sse_event({"error": {"message": "engine died", "type": "InternalServerError", "code": 500}})
    fake_upstream.on("POST", "/v1/chat/completions", sse_response(first + error + b"data: [DONE]\n\n"))
    with make_gateway(fake_upstream) as (client, app):
        response = client.post("/v1/chat/completions", json={**CHAT, "stream": True})
        assert len(app.state.cache) == 0
    chunks = read_sse(response.text)
    assert chunks[-1]["error"]["message"] == "engine died"


def completion_reply(text="Paris.", ids=(5, 6), lps=(-0.3, -0.4)):
    return {
        "id": "cmpl-1",
        "object": "text_completion",
        "created": 1,
        "model": "base",
        "choices": [
            {
                "index": 0,
                "text": text,
                "finish_reason": "length",
                "prompt_token_ids": PROMPT_IDS,
                "token_ids": list(ids),
                "logprobs": {
                    "tokens": ["a", "b"],
                    "token_logprobs": list(lps),
                    "text_offset": [0, 1],
                    "top_logprobs": [{"a": lps[0]}, {"b": lps[1]}],
                },
            }
        ],
        "usage": {},
    }


def test_completions_ask_for_one_logprob_strip_it_and_cache(make_gateway, fake_upstream):
    fake_upstream.on("POST", "/v1/completions", lambda r: httpx.Response(200, json=completion_reply()))
    with make_gateway(fake_upstream) as (client, app):
        body = client.post("/v1/completions", json={"model": "base", "prompt": "Capital of France?"}).json()
        entry = app.state.cache.get("cmpl-1")
    sent = fake_upstream.bodies("/v1/completions")[0]
    assert sent["logprobs"] == 1 and sent["return_token_ids"] is True
    choice = body["choices"][0]
    assert choice["logprobs"] is None and "token_ids" not in choice and "prompt_token_ids" not in choice
    assert entry.messages == [{"role": "user", "content": "Capital of France?"}]
    assert entry.prompt_token_ids == PROMPT_IDS and entry.response_token_ids == [5, 6]
    assert entry.response_logprobs == [-0.3, -0.4]


def test_completions_stream_caches_per_choice_prompt_ids(make_gateway, fake_upstream):
    chunks = [
        {
            "id": "cmpl-s",
            "object": "text_completion",
            "model": "base",
            "choices": [
                {
                    "index": 0,
                    "text": "Par",
                    "prompt_token_ids": PROMPT_IDS,
                    "token_ids": [5],
                    "logprobs": {"token_logprobs": [-0.3], "tokens": ["Par"]},
                    "finish_reason": None,
                }
            ],
        },
        {
            "id": "cmpl-s",
            "object": "text_completion",
            "model": "base",
            "choices": [
                {
                    "index": 0,
                    "text": "is",
                    "token_ids": [6],
                    "logprobs": {"token_logprobs": [-0.4], "tokens": ["is"]},
                    "finish_reason": "length",
                }
            ],
        },
    ]
    body = b"".join(sse_event(c) for c in chunks) + b"data: [DONE]\n\n"
    fake_upstream.on("POST", "/v1/completions", sse_response(body))
    with make_gateway(fake_upstream) as (client, app):
        response = client.post("/v1/completions", json={"model": "base", "prompt": "Q", "stream": True})
        entry = app.state.cache.get("cmpl-s")
    relayed = read_sse(response.text)
    assert "".join(c["choices"][0]["text"] for c in relayed) == "Paris"
    assert "prompt_token_ids" not in relayed[0]["choices"][0] and "logprobs" not in relayed[0]["choices"][0]
    assert entry.prompt_token_ids == PROMPT_IDS and entry.response_token_ids == [5, 6]


def test_score_reads_prompt_logprobs_at_the_completion_positions(make_gateway, fake_upstream):
    def tokenize(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        tokens = PROMPT_IDS if "messages" in body else [40, 41]
        assert body.get("add_generation_prompt", True) and not body.get("add_special_tokens", False)
        return httpx.Response(200, json={"count": len(tokens), "max_model_len": 2048, "tokens": tokens})

    def completions(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        assert body["prompt"] == PROMPT_IDS + [40, 41] and body["max_tokens"] == 1
        plp = [
            None,
            {"2": {"logprob": -9.0, "rank": 3, "decoded_token": "x"}},
            {"3": {"logprob": -8.0, "rank": 1, "decoded_token": "y"}},
            {"40": {"logprob": -1.5, "rank": 2, "decoded_token": " Hi"}, "7": {"logprob": -0.5, "rank": 1}},
            {"41": {"logprob": -0.5, "rank": 1, "decoded_token": "!"}},
        ]
        return httpx.Response(200, json={"id": "c", "choices": [{"index": 0, "text": "", "prompt_logprobs": plp}]})

    fake_upstream.on("POST", "/tokenize", tokenize)
    fake_upstream.on("POST", "/v1/completions", completions)
    with make_gateway(fake_upstream) as (client, _):
        body = client.post("/v1/score", json={"model": "base", "messages": MESSAGES, "completion": " Hi!"}).json()
    assert body["tokens"] == [" Hi", "!"] and body["token_ids"] == [40, 41] and body["logprobs"] == [-1.5, -0.5]
    assert body["sum_logprob"] == -2.0 and body["mean_logprob"] == -1.0 and body["model"] == "base"


@pytest.mark.parametrize("stream", [False, True])
def test_unknown_adapter_known_to_the_engine_is_loaded_and_retried(make_gateway, fake_upstream, make_engine, stream):
    missing = {"error": {"message": "The model `alice/a` does not exist.", "type": "NotFoundError", "code": 404}}
    ok = sse_response(chat_stream()) if stream else (lambda r: httpx.Response(200, json=chat_reply(model="alice/a")))
    fake_upstream.on("POST", "/v1/chat/completions", lambda r: httpx.Response(404, json=missing), ok)
    fake_upstream.on("POST", "/v1/load_lora_adapter", lambda r: httpx.Response(200, text="Success: added."))
    engine = make_engine({"alice/a": "/loras/alice/a"})
    with make_gateway(fake_upstream, engine=engine) as (client, _):
        response = client.post("/v1/chat/completions", json={**CHAT, "model": "alice/a", "stream": stream})
        metrics = client.get("/metrics").text
    assert response.status_code == 200
    assert fake_upstream.bodies("/v1/load_lora_adapter") == [{"lora_name": "alice/a", "lora_path": "/loras/alice/a"}]
    assert len(fake_upstream.bodies("/v1/chat/completions")) == 2
    assert 'claas_adapter_recoveries_total{result="loaded"} 1.0' in metrics


def test_recovery_tolerates_a_concurrent_load(make_gateway, fake_upstream, make_engine):
    missing = {"object": "error", "message": "The model `alice/a` does not exist.", "code": 404}
    fake_upstream.on(
        "POST",
        "/v1/chat/completions",
        lambda r: httpx.Response(404, json=missing),
        lambda r: httpx.Response(200, json=chat_reply(model="alice/a")),
    )
    already = {"object": "error", "message": "The lora adapter 'alice/a' has already been loaded.", "code": 400}
    fake_upstream.on("POST", "/v1/load_lora_adapter", lambda r: httpx.Response(400, json=already))
    fake_upstream.on("GET", "/v1/models", lambda r: httpx.Response(200, json={"data": [{"id": "alice/a"}]}))
    with make_gateway(fake_upstream, engine=make_engine({"alice/a": "/p"})) as (client, _):
        assert client.post("/v1/chat/completions", json={**CHAT, "model": "alice/a"}).status_code == 200


def test_models_lists_upstream_cards_and_hides_other_users_adapters(make_gateway, fake_upstream):
    cards = [
        {"id": "base", "object": "model", "parent": None},
        {"id": "alice/a", "parent": "base"},
        {"id": "bob/b", "parent": "base"},
    ]
    fake_upstream.on("GET", "/v1/models", lambda r: httpx.Response(200, json={"object": "list", "data": cards}))
    with make_gateway(fake_upstream, api_keys="adm,ka:alice/") as (client, _):
        admin = client.get("/v1/models", headers={"Authorization": "Bearer adm"}).json()
        alice = client.get("/v1/models", headers={"Authorization": "Bearer ka"}).json()
    assert admin == {"object": "list", "data": cards}
    assert [c["id"] for c in alice["data"]] == ["base", "alice/a"]


def test_metrics_count_requests_per_route_and_cache_lookups(make_gateway, fake_upstream):
    fake_upstream.on("POST", "/v1/chat/completions", lambda r: httpx.Response(200, json=chat_reply()))
    with make_gateway(fake_upstream) as (client, app):
        client.post("/v1/chat/completions", json=CHAT)
        app.state.cache.get("chatcmpl-abc")
        app.state.cache.get("nope")
        app.state.metrics.feedback_phase_seconds.labels(phase="distill").observe(0.2)
        text = client.get("/metrics").text
    assert 'claas_http_requests_total{method="POST",route="/v1/chat/completions",status="200"} 1.0' in text
    assert 'claas_completion_cache_lookups_total{result="hit"} 1.0' in text
    assert 'claas_completion_cache_lookups_total{result="miss"} 1.0' in text
    assert "claas_completion_cache_entries 1.0" in text
    assert 'claas_feedback_phase_seconds_count{phase="distill"} 1.0' in text


# --- VllmClient on its own -----------------------------------------------------------------------------------------


def client_for(fake_upstream) -> VllmClient:
    return VllmClient("http://upstream.test", transport=httpx.MockTransport(fake_upstream))


def test_num_requests_sums_label_sets_and_wait_until_idle(fake_upstream):
    def metrics(running: int):
        text = (
            "# HELP vllm:num_requests_running Number of requests running.\n# TYPE vllm:num_requests_running gauge\n"
            f'vllm:num_requests_running{{engine="0",model_name="m"}} {running}.0\n'
            f'vllm:num_requests_running{{engine="1",model_name="m"}} 0.0\n'
            "# TYPE vllm:num_requests_waiting gauge\n"
            'vllm:num_requests_waiting{engine="0",model_name="m"} 1.0\n'
        )
        return lambda r: httpx.Response(200, text=text)

    fake_upstream.on("GET", "/metrics", metrics(2), metrics(0))

    async def run():
        client = client_for(fake_upstream)
        assert await client.num_requests() == (2, 1)
        assert await client.num_requests() == (0, 1)
        with pytest.raises(UpstreamTimeoutError, match="still busy"):
            await client.wait_until_idle(timeout_s=0.05, poll_s=0.01)
        await client.aclose()

    asyncio.run(run())


def test_adapter_calls_accept_plain_text_and_map_errors(fake_upstream):
    fake_upstream.on(
        "POST",
        "/v1/load_lora_adapter",
        lambda r: httpx.Response(200, text="Success: LoRA adapter 'a' added successfully."),
        lambda r: httpx.Response(400, json={"object": "error", "message": "already loaded", "code": 400}),
        lambda r: httpx.Response(404, json={"error": {"message": "no such path", "code": 404}}),
    )
    fake_upstream.on(
        "POST",
        "/v1/unload_lora_adapter",
        lambda r: httpx.Response(404, json={"error": {"message": "cannot be found", "code": 404}}),
    )
    fake_upstream.on("POST", "/sleep", lambda r: httpx.Response(200))
    fake_upstream.on("POST", "/wake_up", lambda r: httpx.Response(200))
    fake_upstream.on("GET", "/is_sleeping", lambda r: httpx.Response(200, json={"is_sleeping": True}))
    fake_upstream.on("GET", "/health", lambda r: httpx.Response(200))

    async def run():
        client = client_for(fake_upstream)
        await client.load_lora_adapter("a", "/p")
        with pytest.raises(UpstreamError) as info:
            await client.load_lora_adapter("a", "/p")
        assert info.value.status_code == 400 and info.value.message == "already loaded"
        with pytest.raises(NotFoundError, match="no such path"):
            await client.load_lora_adapter("a", "/missing")
        await client.unload_lora_adapter("a", missing_ok=True)
        with pytest.raises(NotFoundError):
            await client.unload_lora_adapter("a")
        await client.sleep(level=1)
        await client.wake_up()
        assert await client.is_sleeping() is True and await client.health() is True
        await client.aclose()

    asyncio.run(run())
    sleep = next(r for r in fake_upstream.requests if r.url.path == "/sleep")
    assert sleep.url.params["level"] == "1"


def test_reload_is_one_inplace_load_unless_disabled(fake_upstream):
    fake_upstream.on("POST", "/v1/unload_lora_adapter", lambda r: httpx.Response(200, text="removed"))
    fake_upstream.on("POST", "/v1/load_lora_adapter", lambda r: httpx.Response(200, text="added"))

    async def run(inplace: bool):
        transport = httpx.MockTransport(fake_upstream)
        client = VllmClient("http://upstream.test", transport=transport, inplace_reload=inplace)
        await client.reload_lora_adapter("a", "/p")
        await client.aclose()

    asyncio.run(run(True))  # vLLM's load_inplace: no unload, so the name is never unserved
    assert [r.url.path for r in fake_upstream.requests] == ["/v1/load_lora_adapter"]
    body = {"lora_name": "a", "lora_path": "/p", "load_inplace": True}
    assert fake_upstream.bodies("/v1/load_lora_adapter") == [body]
    fake_upstream.requests.clear()
    asyncio.run(run(False))  # fresh adapter id on vLLM (stale prefix-cache blocks otherwise, vllm#42125)
    assert [r.url.path for r in fake_upstream.requests] == ["/v1/unload_lora_adapter", "/v1/load_lora_adapter"]


def test_health_is_false_when_the_server_is_down(unused_port):
    async def run():
        client = VllmClient(f"http://127.0.0.1:{unused_port()}")
        assert await client.health() is False
        await client.aclose()

    asyncio.run(run())
