"""The model server over HTTP with the real SmolLM2 model: one server subprocess for the session (`model_server`).

Clients: the official `openai` SDK where the call is an OpenAI one, httpx for vLLM extras and error shapes.
Generation is kept to a few greedy tokens per request so the module stays well under ~90 s on a 2-core CPU.
"""

from __future__ import annotations

import asyncio
import json
import math
import shutil
import time
import uuid
from typing import Any

import httpx
import pytest

from tests.modelserver.helpers import metric as _metric

pytestmark = pytest.mark.slow

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def paris(oai, model_server) -> dict[str, Any]:
    """One greedy chat answer with logprobs and token ids, reused by several tests."""
    resp = oai.chat.completions.create(
        model=model_server.model,
        messages=QUESTION,
        temperature=0,
        max_tokens=8,
        logprobs=True,
        top_logprobs=2,
        extra_body={"return_token_ids": True},
    )
    return resp.model_dump()


def _score(http: httpx.Client, model: str, ids: list[int], k: int = 1) -> list[Any]:
    """prompt_logprobs of `ids` (the scoring recipe from REFERENCE.md)."""
    r = http.post("/v1/completions", json={"model": model, "prompt": ids, "max_tokens": 1, "prompt_logprobs": k})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["prompt_logprobs"]


def _lp_values(prompt_logprobs: list[Any], ids: list[int]) -> list[float]:
    return [prompt_logprobs[i][str(t)]["logprob"] for i, t in enumerate(ids) if i > 0]


def _assert_error(r: httpx.Response, status: int, *, param: str | None = None, contains: str | None = None) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == status
    if param is not None:
        assert error["param"] == param or param in error["message"], error
    if contains is not None:
        assert contains in error["message"], error
    return error


# ---- basics ------------------------------------------------------------------------------------------------------


def test_health_models_and_tokenize_roundtrip(http, model_server):
    assert http.get("/health").status_code == 200
    models = http.get("/v1/models").json()
    assert models["object"] == "list"
    base = next(card for card in models["data"] if card["id"] == model_server.model)
    assert base["object"] == "model" and base["max_model_len"] == 8192 and base["parent"] is None
    tok = http.post("/tokenize", json={"prompt": "Hello world", "return_token_strs": True}).json()
    assert set(tok) == {"count", "max_model_len", "tokens", "token_strs"}
    assert tok["count"] == len(tok["tokens"]) == len(tok["token_strs"]) and tok["max_model_len"] == 8192
    assert http.post("/detokenize", json={"tokens": tok["tokens"]}).json() == {"prompt": "Hello world"}


def test_chat_names_paris_with_consistent_usage(paris, http):
    choice = paris["choices"][0]
    assert "Paris" in choice["message"]["content"]
    assert choice["message"]["role"] == "assistant"
    assert paris["object"] == "chat.completion" and paris["id"].startswith("chatcmpl-")
    counted = http.post("/tokenize", json={"messages": QUESTION}).json()["count"]
    usage = paris["usage"]
    assert usage["prompt_tokens"] == counted == len(paris["prompt_token_ids"])
    assert usage["completion_tokens"] == len(choice["token_ids"])
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert choice["finish_reason"] in ("stop", "length")


def test_logprobs_match_rescoring_with_prompt_logprobs(paris, http, model_server):
    choice = paris["choices"][0]
    content = choice["logprobs"]["content"]
    gen_ids = choice["token_ids"]
    assert len(content) == len(gen_ids)
    for entry in content:
        assert entry["bytes"] == list(entry["token"].encode("utf-8"))
        assert len(entry["top_logprobs"]) == 2
        assert entry["top_logprobs"][0]["token"] == entry["token"]  # greedy: the chosen token ranks first
    prompt_ids = paris["prompt_token_ids"]
    scored = _score(http, model_server.model, prompt_ids + gen_ids)
    assert scored[0] is None
    for i, (token_id, entry) in enumerate(zip(gen_ids, content)):
        position = scored[len(prompt_ids) + i]
        assert position[str(token_id)]["rank"] == 1
        assert math.isclose(position[str(token_id)]["logprob"], entry["logprob"], abs_tol=1e-4)


def test_chat_stream_concatenates_to_the_non_stream_text(paris, oai, model_server):
    stream = oai.chat.completions.create(
        model=model_server.model,
        messages=QUESTION,
        temperature=0,
        max_tokens=8,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == paris["choices"][0]["message"]["content"]
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [paris["choices"][0]["finish_reason"]]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == paris["usage"]["completion_tokens"]


def test_completion_stream_matches_non_stream_and_ignore_eos(oai, model_server):
    kwargs = dict(model=model_server.model, prompt="The capital of France is", temperature=0, max_tokens=6)
    kwargs["extra_body"] = {"ignore_eos": True}
    full = oai.completions.create(**kwargs)
    assert full.object == "text_completion" and full.choices[0].finish_reason == "length"
    assert full.usage.completion_tokens == 6
    streamed = list(oai.completions.create(stream=True, **kwargs))
    assert "".join(c.choices[0].text for c in streamed if c.choices) == full.choices[0].text
    assert "Paris" in full.choices[0].text


def test_echo_with_zero_max_tokens_scores_the_prompt(http, model_server):
    prompt = "The capital of France is Paris"
    ids = http.post("/tokenize", json={"prompt": prompt}).json()["tokens"]
    body = {"model": model_server.model, "prompt": prompt, "echo": True, "max_tokens": 0, "logprobs": 1}
    r = http.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["text"] == prompt
    logprobs = choice["logprobs"]
    assert set(logprobs) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    assert len(logprobs["tokens"]) == len(ids) and logprobs["token_logprobs"][0] is None
    assert all(lp <= 0 for lp in logprobs["token_logprobs"][1:])
    assert "".join(logprobs["tokens"]) == prompt and logprobs["text_offset"][0] == 0
    assert r.json()["usage"]["prompt_tokens"] == len(ids)


def test_prompt_as_token_ids_equals_text_prompt(http, model_server):
    ids = http.post("/tokenize", json={"prompt": "The capital of France is"}).json()["tokens"]
    common = {"model": model_server.model, "max_tokens": 2, "temperature": 0, "return_token_ids": True}
    by_text = http.post("/v1/completions", json={**common, "prompt": "The capital of France is"}).json()
    by_ids = http.post("/v1/completions", json={**common, "prompt": ids}).json()
    assert by_ids["choices"][0]["text"] == by_text["choices"][0]["text"]
    assert by_ids["choices"][0]["prompt_token_ids"] == ids


def test_stop_strings_and_stop_token_ids(paris, http, model_server):
    text = paris["choices"][0]["message"]["content"]  # "The capital of France is Paris."
    gen_ids = paris["choices"][0]["token_ids"]
    body = {"model": model_server.model, "messages": QUESTION, "temperature": 0, "max_tokens": 8}
    r = http.post("/v1/chat/completions", json={**body, "stop": ["France"]}).json()
    assert r["choices"][0]["message"]["content"] == text[: text.index("France")]
    assert r["choices"][0]["finish_reason"] == "stop" and r["choices"][0]["stop_reason"] == "France"
    with http.stream("POST", "/v1/chat/completions", json={**body, "stop": "France", "stream": True}) as s:
        lines = [line for line in s.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[len("data: ") :]) for line in lines[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == text[: text.index("France")]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    r = http.post("/v1/chat/completions", json={**body, "stop_token_ids": [gen_ids[2]], "return_token_ids": True})
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["stop_reason"] == gen_ids[2]
    assert choice["token_ids"] == gen_ids[:3]


def test_n_with_seed_is_reproducible(oai, model_server):
    def ask() -> list[str]:
        resp = oai.completions.create(
            model=model_server.model, prompt="Once upon a time", n=2, seed=7, temperature=1.0, max_tokens=3
        )
        assert [c.index for c in resp.choices] == [0, 1]
        return [c.text for c in resp.choices]

    assert ask() == ask()


def test_content_parts_tools_and_max_completion_tokens(paris, http, model_server):
    parts = [{"role": "user", "content": [{"type": "text", "text": "What is the capital of France?"}]}]
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
    body = {"model": model_server.model, "messages": parts, "temperature": 0, "max_completion_tokens": 2}
    r = http.post("/v1/chat/completions", json={**body, "tools": tools, "tool_choice": "auto"})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == paris["usage"]["prompt_tokens"]
    assert r.json()["usage"]["completion_tokens"] == 2 and r.json()["choices"][0]["finish_reason"] == "length"


# ---- adapters ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def adapter(http, lora_adapter_dir, paris, model_server):
    """Base scoring of a fixed sequence before any adapter is loaded, then a loaded adapter (unloaded at the end)."""
    ids = paris["prompt_token_ids"] + paris["choices"][0]["token_ids"]
    base_before = _lp_values(_score(http, model_server.model, ids), ids)
    name = f"test-adapter-{uuid.uuid4().hex[:8]}"
    r = http.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(lora_adapter_dir)})
    assert r.status_code == 200 and r.text == f"Success: LoRA adapter '{name}' added successfully."
    yield {"name": name, "ids": ids, "base": base_before, "path": str(lora_adapter_dir)}
    http.post("/v1/unload_lora_adapter", json={"lora_name": name})  # 404 if a test already unloaded it


def test_adapter_changes_logprobs_and_unload_restores_base(adapter, http, model_server, lora_adapter_dir):
    ids = adapter["ids"]
    card = next(c for c in http.get("/v1/models").json()["data"] if c["id"] == adapter["name"])
    assert card["root"] == adapter["path"] and card["parent"] == model_server.model
    tuned = _lp_values(_score(http, adapter["name"], ids), ids)
    assert max(abs(a - b) for a, b in zip(tuned, adapter["base"])) > 0.05
    assert _lp_values(_score(http, model_server.model, ids), ids) == adapter["base"]  # base while adapter loaded
    other = f"tmp-{uuid.uuid4().hex[:8]}"
    assert http.post("/v1/load_lora_adapter", json={"lora_name": other, "lora_path": str(lora_adapter_dir)}).is_success
    r = http.post(
        "/v1/load_lora_adapter", json={"lora_name": other, "lora_path": str(lora_adapter_dir), "load_inplace": True}
    )
    assert r.status_code == 200
    assert _lp_values(_score(http, other, ids), ids) == tuned  # same weights under another name
    r = http.post("/v1/unload_lora_adapter", json={"lora_name": other})
    assert r.status_code == 200 and r.text == f"Success: LoRA adapter '{other}' removed successfully."
    _assert_error(http.post("/v1/completions", json={"model": other, "prompt": "hi"}), 404)


def test_adapter_load_and_unload_errors(adapter, http, model_server, tmp_path):
    load = "/v1/load_lora_adapter"
    _assert_error(
        http.post(load, json={"lora_name": adapter["name"], "lora_path": adapter["path"]}),
        400,
        contains="already been loaded",
    )
    _assert_error(http.post(load, json={"lora_name": "x-missing", "lora_path": str(tmp_path / "nope")}), 404)
    _assert_error(
        http.post(load, json={"lora_name": model_server.model, "lora_path": adapter["path"]}), 400, param="lora_name"
    )
    _assert_error(http.post(load, json={"lora_name": "only-name"}), 400, param="lora_path")
    _assert_error(http.post("/v1/unload_lora_adapter", json={"lora_name": "never-loaded"}), 404)


def test_concurrent_adapter_and_base_requests_match_sequential(adapter, paris, http, model_server):
    body = {"messages": QUESTION, "temperature": 0, "max_tokens": 8, "return_token_ids": True, "logprobs": True}
    sequential_tuned = http.post("/v1/chat/completions", json={**body, "model": adapter["name"]}).json()

    async def both() -> list[dict]:
        async with httpx.AsyncClient(base_url=model_server.base_url, timeout=120.0) as client:
            replies = await asyncio.gather(
                client.post("/v1/chat/completions", json={**body, "model": adapter["name"]}),
                client.post("/v1/chat/completions", json={**body, "model": model_server.model}),
            )
        return [r.json() for r in replies]

    tuned, base = asyncio.run(both())
    assert tuned["model"] == adapter["name"] and base["model"] == model_server.model

    def logprobs(reply: dict) -> list[float]:
        return [entry["logprob"] for entry in reply["choices"][0]["logprobs"]["content"]]

    # Decoded together (a mixed-adapter batch), each gets its own answer. Logprobs agree to float rounding: a batched
    # matmul sums in another order than a single row's (vLLM is not batch-invariant either).
    assert tuned["choices"][0]["token_ids"] == sequential_tuned["choices"][0]["token_ids"]
    assert logprobs(tuned) == pytest.approx(logprobs(sequential_tuned), abs=1e-4)
    assert base["choices"][0]["token_ids"] == paris["choices"][0]["token_ids"]
    paris_logprobs = [entry["logprob"] for entry in paris["choices"][0]["logprobs"]["content"]]
    assert logprobs(base) == pytest.approx(paris_logprobs, abs=1e-4)
    assert max(abs(a - b) for a, b in zip(logprobs(tuned), logprobs(base))) > 0.01  # each saw its own adapter


# ---- sleep / wake ------------------------------------------------------------------------------------------------


def test_sleep_wake_round_trip(adapter, paris, http, model_server):
    body = {
        "model": model_server.model,
        "messages": QUESTION,
        "temperature": 0,
        "max_tokens": 8,
        "return_token_ids": True,
    }
    tuned_before = _lp_values(_score(http, adapter["name"], adapter["ids"]), adapter["ids"])
    try:
        assert http.post("/sleep", params={"level": 1}).status_code == 200
        assert http.get("/is_sleeping").json() == {"is_sleeping": True}
        error = _assert_error(http.post("/v1/chat/completions", json=body), 503)
        assert "sleep" in error["message"].lower()
        assert http.post("/wake_up").status_code == 200
        assert http.get("/is_sleeping").json() == {"is_sleeping": False}
        assert http.post("/sleep", params={"level": 2}).status_code == 200
        _assert_error(http.post("/v1/completions", json={"model": model_server.model, "prompt": "hi"}), 503)
    finally:
        assert http.post("/wake_up").status_code == 200
    after = http.post("/v1/chat/completions", json=body).json()["choices"][0]
    assert after["token_ids"] == paris["choices"][0]["token_ids"]
    assert after["message"]["content"] == paris["choices"][0]["message"]["content"]
    tuned_after = _lp_values(_score(http, adapter["name"], adapter["ids"]), adapter["ids"])
    assert max(abs(a - b) for a, b in zip(tuned_after, tuned_before)) < 1e-5  # adapter re-attached from its path


def test_unloading_restores_the_base_exactly(adapter, http, model_server, tmp_path):
    assert http.post("/v1/unload_lora_adapter", json={"lora_name": adapter["name"]}).status_code == 200
    assert adapter["name"] not in [c["id"] for c in http.get("/v1/models").json()["data"]]
    assert _lp_values(_score(http, model_server.model, adapter["ids"]), adapter["ids"]) == adapter["base"]
    # an adapter whose weights do not fit its config is refused (500, as vLLM's failed add_lora), and leaves no trace
    broken = tmp_path / "broken"
    shutil.copytree(adapter["path"], broken)
    config = json.loads((broken / "adapter_config.json").read_text())
    (broken / "adapter_config.json").write_text(json.dumps({**config, "r": 16}))
    r = http.post("/v1/load_lora_adapter", json={"lora_name": "broken", "lora_path": str(broken)})
    _assert_error(r, 500, contains="rank")
    assert _lp_values(_score(http, model_server.model, adapter["ids"]), adapter["ids"]) == adapter["base"]


def test_client_disconnect_cancels_generation(http, model_server):
    def aborted() -> float:
        lines = http.get("/metrics").text.splitlines()
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in lines
            if line.startswith("vllm:request_success_total{") and 'finished_reason="abort"' in line
        )

    before = aborted()
    body = {
        "model": model_server.model,
        "prompt": "Count: 1, 2,",
        "max_tokens": 2000,
        "ignore_eos": True,
        "stream": True,
    }
    with http.stream("POST", "/v1/completions", json=body) as stream:
        lines = stream.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
    deadline = time.monotonic() + 60
    while aborted() <= before:
        assert time.monotonic() < deadline, "the worker kept generating after the client went away"
        time.sleep(0.2)


# ---- errors ------------------------------------------------------------------------------------------------------

CHAT_BAD = [
    ({"temperature": -1}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"n": 0}, "n"),
    ({"max_tokens": -1}, "max_tokens"),
    ({"top_k": -5}, "top_k"),
    ({"temperature": "hot"}, "temperature"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"stop": [""]}, "stop"),
    ({"tools": []}, "tools"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"messages": "hello"}, "messages"),
    ({"messages": None}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages"),
]


@pytest.mark.parametrize(("patch", "field"), CHAT_BAD, ids=[f"{f}-{i}" for i, (_, f) in enumerate(CHAT_BAD)])
def test_chat_bad_input_is_400_naming_the_field(http, model_server, patch, field):
    body = {"model": model_server.model, "messages": QUESTION, "max_tokens": 1, **patch}
    error = _assert_error(http.post("/v1/chat/completions", json=body), 400)
    assert field in (error["param"] or "") or field in error["message"], error


def test_other_bad_inputs(http, model_server):
    model = model_server.model
    _assert_error(
        http.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}), 400
    )
    _assert_error(http.post("/v1/chat/completions", json={"model": model}), 400, param="messages")
    error = _assert_error(http.post("/v1/chat/completions", json={"model": "no-such-model", "messages": QUESTION}), 404)
    assert error["message"] == "The model `no-such-model` does not exist." and error["type"] == "NotFoundError"
    _assert_error(
        http.post("/v1/completions", json={"model": model, "prompt": "hi", "logprobs": 21}),
        400,
        contains="greater than max allowed: 20",
    )
    _assert_error(
        http.post("/v1/completions", json={"model": model, "prompt": [1, 2, 49152]}),
        400,
        param="prompt",
        contains="out of vocabulary",
    )
    _assert_error(http.post("/v1/completions", json={"model": model, "prompt": [1] * 8192}), 400, contains="8192")
    _assert_error(
        http.post("/v1/completions", json={"model": model, "prompt": [1] * 8000, "max_tokens": 500}),
        400,
        param="max_tokens",
        contains="8192",
    )
    _assert_error(http.post("/v1/completions", json={"model": model, "prompt": ""}), 400, param="prompt")
    _assert_error(http.post("/v1/completions", json={"model": model, "prompt": ["Hi", ""]}), 400, param="prompt")
    _assert_error(http.post("/sleep", params={"level": 3}), 400, param="level")


# ---- metrics -----------------------------------------------------------------------------------------------------


def test_metrics_have_vllm_names_and_count(http, model_server):
    before = http.get("/metrics").text
    for name in (
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:prompt_tokens_total",
        "vllm:generation_tokens_total",
        "vllm:request_success_total",
        "vllm:time_to_first_token_seconds_bucket",
        "vllm:e2e_request_latency_seconds_count",
    ):
        assert name in before, name
    assert f'model_name="{model_server.model}"' in before
    r = http.post("/v1/completions", json={"model": model_server.model, "prompt": "Hi", "max_tokens": 2})
    assert r.status_code == 200
    after = http.get("/metrics").text
    assert _metric(after, "vllm:generation_tokens_total") >= _metric(before, "vllm:generation_tokens_total") + 1
    assert _metric(after, "vllm:prompt_tokens_total") > _metric(before, "vllm:prompt_tokens_total")
    assert _metric(after, "vllm:request_success_total") > _metric(before, "vllm:request_success_total")
    assert _metric(after, "vllm:num_requests_running") == 0


def test_more_adapters_than_max_loras_stay_servable(adapter, http, model_server, lora_adapter_dir):
    """As in vLLM, registered adapters are unlimited; beyond max_loras (8 here) the least recently used one is
    detached and re-read from its path when a request names it again."""
    ids = adapter["ids"]
    names = [f"many-{i}-{uuid.uuid4().hex[:6]}" for i in range(10)]
    try:
        for name in names:
            r = http.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(lora_adapter_dir)})
            assert r.status_code == 200, r.text
        served = {card["id"] for card in http.get("/v1/models").json()["data"]}
        assert set(names) <= served
        tuned = _lp_values(_score(http, names[-1], ids), ids)  # resident: loaded last
        assert max(abs(a - b) for a, b in zip(tuned, adapter["base"])) > 0.05
        # The first one was evicted by the later loads; it is re-attached and gives the same distribution.
        assert _lp_values(_score(http, names[0], ids), ids) == pytest.approx(tuned, abs=1e-5)
    finally:
        for name in names:
            http.post("/v1/unload_lora_adapter", json={"lora_name": name})
