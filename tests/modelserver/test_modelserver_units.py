"""Pure parts of the model server: stop strings, incremental detokenization, sampling params, logits processing
(bias, penalties), sampling, auth."""

from __future__ import annotations

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from claas.modelserver.app import BearerAuth
from claas.modelserver.errors import BadRequest
from claas.modelserver.protocol import ChatCompletionRequest, CompletionRequest
from claas.modelserver.sampling import SamplingParams, build_sampling_params
from claas.modelserver.textstream import IncrementalDetokenizer, StopStringTracker

# ---- stop strings ------------------------------------------------------------------------------------------------


def _run(tracker: StopStringTracker, deltas: list[str]) -> tuple[str, str | None]:
    out = ""
    for delta in deltas:
        text, matched = tracker.add(delta)
        out += text
        if matched is not None:
            return out, matched
    return out + tracker.flush(), None


def test_stop_string_across_deltas_is_cut_and_never_streamed():
    out, matched = _run(StopStringTracker(("END",), include_stop_str=False), ["abc E", "N", "D tail"])
    assert (out, matched) == ("abc ", "END")


def test_include_stop_str_keeps_it_and_earliest_stop_wins():
    out, matched = _run(StopStringTracker(("zz", "b"), include_stop_str=True), ["a", "bzz"])
    assert (out, matched) == ("ab", "b")


@given(st.lists(st.text(alphabet="abcX", max_size=4), max_size=12))
def test_without_a_match_the_deltas_reassemble_the_text(deltas):
    tracker = StopStringTracker(("XXXXX",), include_stop_str=False)
    out, matched = _run(tracker, deltas)
    joined = "".join(deltas)
    if "XXXXX" in joined:
        assert matched == "XXXXX" and out == joined[: joined.index("XXXXX")]
    else:
        assert matched is None and out == joined


# ---- incremental detokenization ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(model_cache_dir):
    from transformers import AutoTokenizer

    from claas.core.models import resolve_model_path

    return AutoTokenizer.from_pretrained(resolve_model_path("smollm2-135m", model_cache_dir))


@pytest.mark.parametrize("text", ["Hello, world! The capital of France is Paris.", "naïve café — 東京 🚀 done"])
def test_incremental_detokenizer_reassembles_full_decode(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, [1, 2, 3], skip_special_tokens=True)
    pieces = [detok.push(i) for i in ids]
    assert "".join(pieces) + detok.flush() == tokenizer.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)


# ---- sampling params ---------------------------------------------------------------------------------------------


def _chat(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], **fields)


def _params(req, max_tokens: int = 8, logprobs: int | None = None, defaults: dict | None = None) -> SamplingParams:
    return build_sampling_params(
        req,
        max_tokens=max_tokens,
        max_tokens_param="max_tokens",
        logprobs=logprobs,
        logprobs_param="logprobs",
        vocab_size=49152,
        defaults=defaults,
    )


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"temperature": -0.5}, "temperature"),
        ({"temperature": 2.5}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"n": 0}, "n"),
        ({"n": 2, "temperature": 0}, "n"),
        ({"min_tokens": 9}, "min_tokens"),
        ({"stop": ["ok", ""]}, "stop"),
        ({"stop_token_ids": [49152]}, "stop_token_ids"),
        ({"logit_bias": {"49152": 1.0}}, "logit_bias"),
        ({"logit_bias": {"x": 1.0}}, "logit_bias"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -2.5}, "frequency_penalty"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"min_p": 1.5}, "min_p"),
        ({"prompt_logprobs": 21}, "prompt_logprobs"),
        ({"prompt_logprobs": 1, "stream": True}, "prompt_logprobs"),
    ],
)
def test_out_of_range_values_name_the_field(fields, param):
    with pytest.raises(BadRequest) as info:
        _params(_chat(**fields))
    assert info.value.param == param and info.value.status == 400


def test_sampling_defaults_and_logprob_cap():
    params = _params(CompletionRequest(prompt="x", stop="\n", seed=-1), logprobs=20)
    assert params.temperature == 1.0 and params.top_p == 1.0 and params.stop == ("\n",) and params.seed is None
    with pytest.raises(BadRequest, match="greater than max allowed: 20"):
        _params(CompletionRequest(prompt="x"), logprobs=21)
    with pytest.raises(BadRequest, match="max_tokens must be at least 1"):
        _params(CompletionRequest(prompt="x"), max_tokens=0)


def test_out_of_vocab_ids_are_named_in_the_message():
    with pytest.raises(BadRequest, match=r"token_id\(s\) \[49152, 60000\] in stop_token_ids"):
        _params(_chat(stop_token_ids=[3, 49152, 60000]))
    with pytest.raises(BadRequest, match=r"token_id\(s\) \[-1\] in logit_bias contain out-of-vocab"):
        _params(_chat(logit_bias={"-1": 2.0, "5": 1.0}))


def test_logit_bias_is_clamped_and_penalties_kept():
    params = _params(_chat(logit_bias={"7": 500.0, "8": -3.0}, presence_penalty=0.5, repetition_penalty=1.2))
    assert params.logit_bias == ((7, 100.0), (8, -3.0))
    assert params.presence_penalty == 0.5 and params.repetition_penalty == 1.2 and params.penalized


def test_generation_defaults_fill_only_omitted_fields():
    defaults = {"temperature": 0.2, "top_p": 0.9, "repetition_penalty": 1.1}
    omitted = _params(_chat(), defaults=defaults)
    assert (omitted.temperature, omitted.top_p, omitted.repetition_penalty) == (0.2, 0.9, 1.1)
    explicit = _params(_chat(temperature=0.7, top_p=0.5, repetition_penalty=1.0), defaults=defaults)
    assert (explicit.temperature, explicit.top_p, explicit.repetition_penalty) == (0.7, 0.5, 1.0)
    greedy = _params(_chat(temperature=0), defaults=defaults)
    assert greedy.greedy and greedy.top_p == 1.0  # vLLM resets top-p/top-k/min-p for greedy


def test_logits_adjuster_matches_vllm_penalty_definitions():
    import torch

    from claas.modelserver.sampling import LogitsAdjuster

    logits = torch.tensor([2.0, -1.0, 0.5, 3.0])
    banned = torch.tensor([3])
    plain = LogitsAdjuster(SamplingParams(), [0], banned, 4)
    assert plain(logits, 0) is logits  # nothing to do: the raw tensor, untouched
    rep = LogitsAdjuster(SamplingParams(repetition_penalty=2.0), [0, 1], banned, 4)
    assert rep(logits, 0).tolist() == [1.0, -2.0, 0.5, 3.0]  # prompt tokens: positive / 2, negative * 2
    freq = LogitsAdjuster(SamplingParams(frequency_penalty=0.5, presence_penalty=0.25), [0], banned, 4)
    freq.observe(2)
    freq.observe(2)
    assert freq(logits, 0).tolist() == [2.0, -1.0, 0.5 - 1.0 - 0.25, 3.0]  # output counts only, not the prompt
    bias = LogitsAdjuster(SamplingParams(logit_bias=((1, 10.0),), min_tokens=1), [0], banned, 4)
    out = bias(logits, 0)
    assert out[1] == 9.0 and out[3] == float("-inf")  # bias added; min_tokens bans EOS/stop ids at step 0
    assert bias(logits, 1)[3] == 3.0
    assert logits.tolist() == [2.0, -1.0, 0.5, 3.0]  # the raw logits (reported as logprobs) stay unprocessed


def test_sample_token_greedy_top_k_and_seed():
    import torch

    from claas.modelserver.sampling import make_generator, rows_logprobs, sample_token

    logits = torch.tensor([0.0, 3.0, 1.0, 2.9])
    assert sample_token(logits, SamplingParams(temperature=0.0), None) == 1
    draws = {sample_token(logits, SamplingParams(top_k=1), make_generator(s, torch.device("cpu"))) for s in range(20)}
    assert draws == {1}
    a = [sample_token(logits, SamplingParams(), make_generator(5, torch.device("cpu"))) for _ in range(3)]
    b = [sample_token(logits, SamplingParams(), make_generator(5, torch.device("cpu"))) for _ in range(3)]
    assert a == b
    (row,) = rows_logprobs(logits.unsqueeze(0), [2], top_k=2)
    assert row.rank == 3 and row.top_ids == [1, 3]
    assert row.logprob == pytest.approx(float(torch.log_softmax(logits, -1)[2]))


# ---- auth --------------------------------------------------------------------------------------------------------


def test_bearer_auth_guards_only_v1():
    inner = Starlette(
        routes=[
            Route("/v1/models", lambda r: PlainTextResponse("ok")),
            Route("/health", lambda r: PlainTextResponse("ok")),
        ]
    )
    transport = httpx.ASGITransport(app=BearerAuth(inner, api_key="sekret"))

    async def go() -> list[int]:
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return [
                (await client.get("/v1/models")).status_code,
                (await client.get("/v1/models", headers={"Authorization": "Bearer wrong"})).status_code,
                (await client.get("/v1/models", headers={"Authorization": "Bearer sekret"})).status_code,
                (await client.get("/health")).status_code,
            ]

    import asyncio

    assert asyncio.run(go()) == [401, 401, 200, 200]
