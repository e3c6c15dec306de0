"""vLLM behaviours of the model server beyond the basics (issue 10), against the session `model_server` subprocess.

Each test states the vLLM behaviour it checks (from vLLM's source: `SamplingParams._verify_args` and
`_validate_*`, the v1 sampler's logits processing, `OpenAIServingModels.load_lora_adapter`, the executor's
sleep/wake tags, `vllm/v1/metrics/loggers.py`). Adapter variants are written with `safetensors.numpy`, so this process
stays free of torch. Tests that sleep the server wake it in a `finally`.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.modelserver.helpers import metric as _metric
from tests.modelserver.helpers import variant as _variant

pytestmark = pytest.mark.slow

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def _error(r: httpx.Response, status: int, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == status
    if param is not None:
        assert error["param"] == param, error
    return error


def _scores(http: httpx.Client, model: str, ids: list[int]) -> list[float]:
    r = http.post("/v1/completions", json={"model": model, "prompt": ids, "max_tokens": 1, "prompt_logprobs": 0})
    assert r.status_code == 200, r.text
    return [entry[str(t)]["logprob"] for entry, t in zip(r.json()["choices"][0]["prompt_logprobs"], ids) if entry]


@pytest.fixture(scope="module")
def ids(http) -> list[int]:
    text = "The lighthouse keeper found a bottle on the shore."
    return http.post("/tokenize", json={"prompt": text}).json()["tokens"]


def _load(http: httpx.Client, name: str, path: str, inplace: bool = False) -> httpx.Response:
    return http.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path, "load_inplace": inplace})


# ---- 1. streaming usage ------------------------------------------------------------------------------------------


def test_completion_stream_usage_chunk_and_continuous_usage(oai, model_server):
    chunks = list(
        oai.completions.create(
            model=model_server.model,
            prompt=["Hello", "The sky is"],
            max_tokens=3,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True, "continuous_usage_stats": True},
        )
    )
    final = chunks[-1]
    assert final.choices == [] and final.usage is not None
    assert final.usage.completion_tokens == 6 and final.usage.total_tokens == final.usage.prompt_tokens + 6
    per_token = [c for c in chunks[:-1] if c.choices]
    assert all(c.usage is not None for c in per_token)  # vLLM: continuous usage on every chunk
    assert [c.usage.completion_tokens for c in per_token if c.choices[0].index == 0] == [1, 2, 3]


# ---- 2. logit_bias, penalties ------------------------------------------------------------------------------------


def test_logit_bias_is_applied_and_bad_ids_are_named(http, model_server):
    body = {"model": model_server.model, "prompt": "The cat", "max_tokens": 4, "temperature": 0}
    plain = http.post("/v1/completions", json={**body, "return_token_ids": True}).json()["choices"][0]["token_ids"]
    forced = http.post(
        "/v1/completions", json={**body, "return_token_ids": True, "logit_bias": {"28": 100}}
    ).json()["choices"][0]["token_ids"]
    assert forced == [28, 28, 28, 28] and plain != forced
    banned = http.post(
        "/v1/completions", json={**body, "return_token_ids": True, "logit_bias": {str(plain[0]): -100}}
    ).json()["choices"][0]["token_ids"]
    assert banned[0] != plain[0]
    error = _error(http.post("/v1/completions", json={**body, "logit_bias": {"99999": 1}}), 400, "logit_bias")
    assert "99999" in error["message"] and "out-of-vocab" in error["message"]
    error = _error(http.post("/v1/completions", json={**body, "stop_token_ids": [2, 70000]}), 400, "stop_token_ids")
    assert "[70000]" in error["message"]


def test_penalties_change_greedy_repetition_as_vllm(http, model_server):
    body = {"model": model_server.model, "prompt": "1 1 1 1 1 1 1 1", "max_tokens": 6, "temperature": 0}

    def tokens(**extra: Any) -> list[int]:
        r = http.post("/v1/completions", json={**body, "return_token_ids": True, **extra})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["token_ids"]

    plain = tokens()
    assert len(set(plain)) <= 2  # the model keeps repeating " 1"
    repeated = max(set(plain), key=plain.count)
    assert repeated not in tokens(repetition_penalty=3.0)[:1]  # prompt tokens are penalized too
    assert tokens(frequency_penalty=2.0).count(repeated) < plain.count(repeated)
    assert tokens(presence_penalty=2.0).count(repeated) < plain.count(repeated)
    for field, value in (("presence_penalty", 2.5), ("frequency_penalty", -3), ("repetition_penalty", 0)):
        _error(http.post("/v1/completions", json={**body, field: value}), 400, field)


# ---- 3, 4. metrics and sleep states ------------------------------------------------------------------------------


def test_new_metric_families_have_honest_values(http, model_server):
    r = http.post("/v1/completions", json={"model": model_server.model, "prompt": "Hi", "max_tokens": 2, "n": 1})
    assert r.status_code == 200
    text = http.get("/metrics").text
    for name in (
        "vllm:prefix_cache_queries_total",
        "vllm:prefix_cache_hits_total",
        "vllm:num_preemptions_total",
        "vllm:iteration_tokens_total_bucket",
        "vllm:cache_config_info",
        "vllm:request_params_n_count",
        "vllm:request_params_max_tokens_count",
        "vllm:request_inference_time_seconds_count",
        "vllm:request_prefill_time_seconds_count",
        "vllm:request_decode_time_seconds_count",
        "vllm:request_num_preemptions_count",
    ):
        assert name in text, name
    assert _metric(text, "vllm:kv_cache_usage_perc") == 0.0  # idle
    assert _metric(text, "vllm:prefix_cache_queries_total") > 0 and _metric(text, "vllm:prefix_cache_hits_total") == 0
    assert _metric(text, "vllm:num_preemptions_total") == 0
    assert _metric(text, "vllm:request_params_max_tokens_sum") >= 2
    assert _metric(text, "vllm:engine_sleep_state", sleep_state="awake") == 1


def test_partial_wake_and_sleep_state_metric(http, model_server):
    body = {"model": model_server.model, "prompt": "Hi", "max_tokens": 1}

    def states() -> tuple[float, float, float]:
        text = http.get("/metrics").text
        return tuple(_metric(text, "vllm:engine_sleep_state", sleep_state=s) for s in SLEEP_STATES)  # type: ignore

    try:
        assert http.post("/sleep", params={"level": 1}).status_code == 200
        assert states() == (0, 1, 0)
        assert http.post("/wake_up", params={"tags": "weights"}).status_code == 200
        assert http.get("/is_sleeping").json() == {"is_sleeping": True}  # kv_cache still asleep
        _error(http.post("/v1/completions", json=body), 503)
        assert http.post("/wake_up", params={"tags": "bogus"}).status_code == 200  # vLLM: logged no-op
        assert http.get("/is_sleeping").json() == {"is_sleeping": True}
        assert http.post("/wake_up", params={"tags": "kv_cache"}).status_code == 200
        assert http.get("/is_sleeping").json() == {"is_sleeping": False} and states() == (1, 0, 0)
        assert http.post("/sleep", params={"level": 2}).status_code == 200
        assert states() == (0, 0, 1)
    finally:
        assert http.post("/wake_up").status_code == 200
    assert states() == (1, 0, 0)
    assert http.post("/v1/completions", json=body).status_code == 200


SLEEP_STATES = ("awake", "weights_offloaded", "discard_all")


# ---- 5, issue 8 finding 12. LoRA errors --------------------------------------------------------------------------


def test_unreadable_adapter_config_is_500_and_the_server_stays_healthy(http, model_server, lora_adapter_dir, tmp_path):
    path = _variant(lora_adapter_dir, tmp_path / "bad-json", config="{not json")
    error = _error(_load(http, "bad-json", path), 500)
    assert error["type"] == "InternalServerError" and "adapter_config.json" in error["message"]
    assert http.get("/health").status_code == 200
    assert "bad-json" not in {c["id"] for c in http.get("/v1/models").json()["data"]}
    assert http.post("/v1/completions", json={"model": model_server.model, "prompt": "Hi", "max_tokens": 1}).is_success
    _error(http.post("/v1/unload_lora_adapter", json={"lora_name": ""}), 400, "lora_name")
    _error(http.post("/v1/unload_lora_adapter", json={}), 400, "lora_name")
    _error(http.post("/v1/unload_lora_adapter", json={"lora_name": "never-loaded-x"}), 404)


def test_adapter_loaded_during_level2_sleep_is_validated_and_served(http, lora_adapter_dir, ids, tmp_path):
    awake_name, asleep_name = f"awake-{uuid.uuid4().hex[:6]}", f"asleep-{uuid.uuid4().hex[:6]}"
    broken = _variant(lora_adapter_dir, tmp_path / "rank-mismatch", rank=4)
    cfg = json.loads((lora_adapter_dir / "adapter_config.json").read_text())
    (Path(broken) / "adapter_config.json").write_text(json.dumps({**cfg, "r": 8}))  # weights say rank 4
    assert _load(http, awake_name, str(lora_adapter_dir)).status_code == 200
    expected = _scores(http, awake_name, ids)
    try:
        assert http.post("/sleep", params={"level": 2}).status_code == 200
        error = _error(_load(http, "broken-asleep", broken), 500)
        assert "rank 4" in error["message"]  # refused at load time, not on the first request
        assert _load(http, asleep_name, str(lora_adapter_dir)).status_code == 200
    finally:
        assert http.post("/wake_up").status_code == 200
    try:
        assert _scores(http, asleep_name, ids) == pytest.approx(expected, abs=1e-5)
    finally:
        for name in (awake_name, asleep_name):
            http.post("/v1/unload_lora_adapter", json={"lora_name": name})


# ---- 6. generation defaults --------------------------------------------------------------------------------------


def test_omitted_sampling_fields_use_the_model_generation_defaults(http, model_server):
    body = {"model": model_server.model, "messages": QUESTION, "max_tokens": 12, "seed": 7, "return_token_ids": True}

    def answer(**extra: Any) -> list[int]:
        r = http.post("/v1/chat/completions", json={**body, **extra})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["token_ids"]

    defaulted = answer()
    assert defaulted == answer(temperature=0.2, top_p=0.9)  # SmolLM2's registry generation defaults
    assert defaulted != answer(temperature=1.0, top_p=1.0)  # not vLLM's neutral temperature 1.0


# ---- 9. in-place adapter swap ------------------------------------------------------------------------------------


def test_inplace_load_serves_the_new_weights_exactly(http, lora_adapter_dir, ids, tmp_path):
    name, fresh, other_rank = (f"{p}-{uuid.uuid4().hex[:6]}" for p in ("swap", "fresh", "rank4"))
    doubled = _variant(lora_adapter_dir, tmp_path / "doubled", scale_b=2.0)
    rank4 = _variant(lora_adapter_dir, tmp_path / "rank4", rank=4)
    try:
        assert _load(http, name, str(lora_adapter_dir)).status_code == 200
        old = _scores(http, name, ids)
        assert _load(http, fresh, doubled).status_code == 200
        new = _scores(http, fresh, ids)
        assert max(abs(a - b) for a, b in zip(old, new)) > 0.01
        r = _load(http, name, doubled, inplace=True)
        assert r.status_code == 200 and r.text == f"Success: LoRA adapter '{name}' added successfully."
        assert _scores(http, name, ids) == new  # the next request uses the new weights, bit for bit
        card = next(c for c in http.get("/v1/models").json()["data"] if c["id"] == name)
        assert card["root"] == doubled
        # other structure (rank 4): not copyable, so the adapter is rebuilt, still under the same name
        assert _load(http, name, rank4, inplace=True).status_code == 200
        assert _load(http, other_rank, rank4).status_code == 200
        assert _scores(http, name, ids) == _scores(http, other_rank, ids)
    finally:
        for adapter in (name, fresh, other_rank):
            http.post("/v1/unload_lora_adapter", json={"lora_name": adapter})


def test_concurrent_requests_never_see_a_half_swapped_adapter(model_server, http, lora_adapter_dir, ids, tmp_path):
    name = f"flip-{uuid.uuid4().hex[:6]}"
    paths = [str(lora_adapter_dir), _variant(lora_adapter_dir, tmp_path / "flip", scale_b=-1.0)]
    assert _load(http, name, paths[0]).status_code == 200
    try:
        a = _scores(http, name, ids)
        assert _load(http, name, paths[1], inplace=True).status_code == 200
        b = _scores(http, name, ids)
        assert max(abs(x - y) for x, y in zip(a, b)) > 0.01

        async def storm() -> list[list[float]]:
            body = {"model": name, "prompt": ids, "max_tokens": 1, "prompt_logprobs": 0}
            async with httpx.AsyncClient(base_url=model_server.base_url, timeout=120.0) as client:

                async def score() -> list[float]:
                    r = await client.post("/v1/completions", json=body)
                    assert r.status_code == 200, r.text
                    rows = r.json()["choices"][0]["prompt_logprobs"]
                    return [row[str(t)]["logprob"] for row, t in zip(rows, ids) if row]

                async def swaps() -> None:
                    for i in range(6):
                        load = {"lora_name": name, "lora_path": paths[i % 2], "load_inplace": True}
                        assert (await client.post("/v1/load_lora_adapter", json=load)).status_code == 200

                results = await asyncio.gather(*(score() for _ in range(12)), swaps())
            return [r for r in results if r is not None]

        seen = asyncio.run(storm())
        assert len(seen) == 12
        assert all(s == a or s == b for s in seen)  # each request saw one whole adapter version
    finally:
        http.post("/v1/unload_lora_adapter", json={"lora_name": name})
