"""Continuous batching in the model server (issue 10, item 7), against the session `model_server` subprocess.

Concurrent requests are decoded together (one forward per step for every running choice, joining and leaving
between steps); each must still get what it gets alone: the same greedy tokens, stop handling, seeded samples, and
logprobs up to float rounding (a batched matmul sums in another order, as in vLLM). That batching really happened is
read from vLLM's `vllm:iteration_tokens_total` histogram: a decode step of 2..8 running choices lands between its
`le="1.0"` and `le="8.0"` buckets (every prompt here is longer than 8 tokens, so no prefill lands there).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.modelserver.helpers import metric, variant

pytestmark = pytest.mark.slow

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about autumn leaves falling on a quiet pond in the early morning light.",
    "List three fruits.",
    "Explain gravity to a child in two sentences.",
    "Translate 'good morning' into Spanish.",
    "Hi",
    "Name a famous painter and one of their works, and say why it matters.",
    "What is 2+2?",
]


def _chat(model: str, prompt: str, max_tokens: int, **extra: Any) -> dict[str, Any]:
    messages = [{"role": "user", "content": prompt}]
    return {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0, **extra}


def _small_steps(http: httpx.Client) -> float:
    """Engine steps so far that carried 2..8 tokens: batched decode steps."""
    text = http.get("/metrics").text
    name = "vllm:iteration_tokens_total_bucket"
    return metric(text, name, le="8.0") - metric(text, name, le="1.0")


async def _staggered(base_url: str, bodies: list[dict[str, Any]], gap_s: float = 0.05) -> list[dict[str, Any]]:
    """POST every body to /v1/chat/completions, each `gap_s` after the previous (so they join a running batch)."""
    async with httpx.AsyncClient(base_url=base_url, timeout=300.0) as client:

        async def one(i: int, body: dict[str, Any]) -> dict[str, Any]:
            await asyncio.sleep(i * gap_s)
            r = await client.post("/v1/chat/completions", json=body)
            assert r.status_code == 200, r.text
            return r.json()

        return list(await asyncio.gather(*(one(i, b) for i, b in enumerate(bodies))))


def _choice(reply: dict[str, Any]) -> tuple[list[int], str, str]:
    c = reply["choices"][0]
    return c["token_ids"], c["message"]["content"], c["finish_reason"]


def _logprobs(reply: dict[str, Any]) -> list[float]:
    return [e["logprob"] for e in reply["choices"][0]["logprobs"]["content"]]


@pytest.fixture(scope="module")
def second_adapter(http, lora_adapter_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """Two adapters loaded at once (other weights), so one batch can mix base, adapter A and adapter B rows."""
    root = tmp_path_factory.mktemp("batching")
    names = [f"batch-a-{uuid.uuid4().hex[:6]}", f"batch-b-{uuid.uuid4().hex[:6]}"]
    paths = [str(lora_adapter_dir), variant(lora_adapter_dir, root / "b", scale_b=-1.5)]
    for name, path in zip(names, paths):
        r = http.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path})
        assert r.status_code == 200, r.text
    yield names
    for name in names:
        http.post("/v1/unload_lora_adapter", json={"lora_name": name})


def test_concurrent_requests_get_their_single_stream_answers(http, model_server, second_adapter):
    models = [model_server.model, *second_adapter]
    bodies = [
        _chat(models[i % 3], prompt, 6 + 3 * i, return_token_ids=True, logprobs=True, top_logprobs=2)
        for i, prompt in enumerate(PROMPTS)
    ]
    bodies[3]["stop"] = [" the "]  # a stop string inside a batch
    bodies[5]["ignore_eos"] = True
    alone = [http.post("/v1/chat/completions", json=b).json() for b in bodies]
    before = _small_steps(http)
    together = asyncio.run(_staggered(model_server.base_url, bodies))
    assert _small_steps(http) - before >= 10  # they were decoded together, in steps of several rows
    for solo, batched in zip(alone, together):
        assert _choice(batched) == _choice(solo)  # tokens, text (stop string applied), finish reason
        assert _logprobs(batched) == pytest.approx(_logprobs(solo), abs=1e-4)
        assert batched["usage"] == solo["usage"]
    assert any(_choice(r)[2] == "stop" for r in alone) and any(_choice(r)[2] == "length" for r in alone)
    assert len({tuple(_choice(r)[0]) for r in together[:3]}) == 3  # base, A and B answered differently


def test_seeded_samples_and_n_are_unchanged_by_batching(http, model_server):
    sampled = {"temperature": 0.9, "top_p": 0.95, "seed": 1234, "n": 3, "return_token_ids": True}
    body = {**_chat(model_server.model, PROMPTS[1], 24), **sampled}
    alone = http.post("/v1/chat/completions", json=body).json()
    greedy = [_chat(model_server.model, p, 24, return_token_ids=True) for p in PROMPTS[:4]]
    together = asyncio.run(_staggered(model_server.base_url, [*greedy, body]))
    ids = [c["token_ids"] for c in together[-1]["choices"]]
    assert ids == [c["token_ids"] for c in alone["choices"]]
    assert len({tuple(i) for i in ids}) == 3  # seed, seed+1, seed+2: three different samples


def test_more_requests_than_max_num_seqs_wait_and_all_finish(http, model_server):
    """The session server runs with the default --max-num-seqs 16; 20 requests must queue and still all be right."""
    bodies = [_chat(model_server.model, PROMPTS[i % len(PROMPTS)], 4, return_token_ids=True) for i in range(20)]
    alone = {p: http.post("/v1/chat/completions", json=bodies[i]).json() for i, p in enumerate(PROMPTS)}
    together = asyncio.run(_staggered(model_server.base_url, bodies, gap_s=0.0))
    for body, reply in zip(bodies, together):
        assert _choice(reply) == _choice(alone[body["messages"][0]["content"]])


def test_a_cancelled_stream_leaves_the_batch_and_the_others_are_unaffected(http, model_server):
    base = model_server.model
    long_body = {**_chat(base, PROMPTS[0], 400, ignore_eos=True), "stream": True}
    other = _chat(base, PROMPTS[2], 24, return_token_ids=True)
    alone = http.post("/v1/chat/completions", json=other).json()
    generated_before = metric(http.get("/metrics").text, "vllm:generation_tokens_total")

    async def run() -> dict[str, Any]:
        async with httpx.AsyncClient(base_url=model_server.base_url, timeout=300.0) as client:
            async with client.stream("POST", "/v1/chat/completions", json=long_body) as stream:
                lines = stream.aiter_lines()
                while "content" not in await anext(lines):  # the long stream is decoding
                    pass
                reply = asyncio.ensure_future(client.post("/v1/chat/completions", json=other))
                for _ in range(5):
                    await anext(lines)
            # the stream is closed here (client went away), the other request is still decoding beside it
            return (await reply).json()

    together = asyncio.run(run())
    assert _choice(together) == _choice(alone)
    deadline = time.monotonic() + 30
    while metric(http.get("/metrics").text, "vllm:num_requests_running") > 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    generated = metric(http.get("/metrics").text, "vllm:generation_tokens_total") - generated_before
    assert generated < 400  # the cancelled stream stopped long before its 400 tokens


def test_an_in_place_reload_waits_for_running_answers(http, model_server, lora_adapter_dir, tmp_path):
    """A control job (here the feedback loop's in-place reload) runs between answers: the answer running when it was
    sent is wholly the old adapter's, the next one wholly the new one's."""
    name = f"swap-{uuid.uuid4().hex[:6]}"
    paths = [str(lora_adapter_dir), variant(lora_adapter_dir, tmp_path / "v2", scale_b=-1.5)]
    assert http.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": paths[0]}).status_code == 200
    body = _chat(name, PROMPTS[1], 40, return_token_ids=True, ignore_eos=True)
    try:
        old = http.post("/v1/chat/completions", json=body).json()

        async def run() -> tuple[dict[str, Any], dict[str, Any]]:
            async with httpx.AsyncClient(base_url=model_server.base_url, timeout=300.0) as client:
                running = asyncio.ensure_future(client.post("/v1/chat/completions", json=body))
                await asyncio.sleep(0.5)  # decoding by now (40 tokens take ~2 s here)
                load = {"lora_name": name, "lora_path": paths[1], "load_inplace": True}
                assert (await client.post("/v1/load_lora_adapter", json=load)).status_code == 200
                after = await client.post("/v1/chat/completions", json=body)
                return (await running).json(), after.json()

        during, after = asyncio.run(run())
        new = http.post("/v1/chat/completions", json=body).json()
        assert _choice(during) == _choice(old)
        assert _choice(after) == _choice(new) != _choice(old)
    finally:
        http.post("/v1/unload_lora_adapter", json={"lora_name": name})
