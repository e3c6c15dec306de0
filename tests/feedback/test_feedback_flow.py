"""The feedback transaction end to end: real model server, real local engine, real gateway on 127.0.0.1."""

from __future__ import annotations

import asyncio
import io
import json
import threading
import uuid
import zipfile
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

pytestmark = pytest.mark.slow

QUESTION = "Hi! Who are you?"
FEEDBACK = "Your name is Kuro. Always introduce yourself as Kuro."
FAST = {"learning_rate": 1e-3}
HTTP = httpx.Client(timeout=900)  # a busy 2-core machine can be slow; no test here asserts on time


def new_lora(gw: Any, rank: int = 8) -> str:
    lora_id = f"fb/{uuid.uuid4().hex[:10]}"
    reply = HTTP.post(f"{gw.v1}/lora/init", json={"lora_id": lora_id, "lora_r": rank, "lora_alpha": 2 * rank},
                       timeout=120)
    assert reply.status_code == 200, reply.text
    return lora_id


def chat(gw: Any, model: str, content: str = QUESTION, max_tokens: int = 16) -> Any:
    client = openai.OpenAI(base_url=gw.v1, api_key="unused")
    return client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": content}], temperature=0, max_tokens=max_tokens
    )


def score(gw: Any, model: str, completion: str) -> float:
    reply = HTTP.post(f"{gw.v1}/score", json={"model": model, "completion": completion,
                                               "messages": [{"role": "user", "content": QUESTION}]})
    assert reply.status_code == 200, reply.text
    return reply.json()["sum_logprob"]


def feedback(gw: Any, lora_id: str, response: str, **extra: Any) -> httpx.Response:
    body = {"lora_id": lora_id, "prompt": QUESTION, "response": response, "feedback": FEEDBACK,
            "training": FAST, **extra}
    return HTTP.post(f"{gw.v1}/feedback", json=body)


def steps(gw: Any, lora_id: str) -> int:
    loras = HTTP.get(f"{gw.v1}/lora", params={"prefix": lora_id}).json()["loras"]
    return next(lora["step"] for lora in loras if lora["lora_id"] == lora_id)


def test_init_makes_the_adapter_servable_at_once(feedback_gateway: Any) -> None:
    lora_id = new_lora(feedback_gateway)
    served = HTTP.get(f"{feedback_gateway.model_server_url}/v1/models").json()["data"]
    assert lora_id in [card["id"] for card in served]
    # A fresh adapter is the identity: it answers like the base model.
    assert chat(feedback_gateway, lora_id).choices[0].message.content == chat(
        feedback_gateway, feedback_gateway.base_model).choices[0].message.content
    again = HTTP.post(f"{feedback_gateway.v1}/lora/init", json={"lora_id": lora_id})
    assert again.status_code == 409 and again.json()["error"]["type"] == "invalid_request_error"


def test_feedback_on_a_served_answer_trains_on_its_exact_tokens(feedback_gateway: Any) -> None:
    gw = feedback_gateway
    lora_id = new_lora(gw)
    answer = chat(gw, lora_id).choices[0].message.content
    direct = HTTP.post(f"{gw.model_server_url}/v1/chat/completions", json={
        "model": lora_id, "messages": [{"role": "user", "content": QUESTION}], "temperature": 0, "max_tokens": 16,
        "return_token_ids": True, "logprobs": True}).json()
    before = score(gw, lora_id, answer)
    since = len(gw.engine.batches)

    reply = feedback(gw, lora_id, answer)
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["status"] == "ok" and body["sources"] == ["cache"] and body["batch_size"] == 1
    assert body["vllm"] == {"slept": True, "woke": True}
    assert body["distill_result"]["step"] == 1
    assert set(body["timing_ms"]) >= {"lock_wait", "sleep", "distill", "save", "reload", "wake", "total"}
    (batch,) = gw.engine.batches[since:]
    example = batch.examples[0]
    assert example.source == "cache"
    assert example.prompt_token_ids == direct["prompt_token_ids"]
    assert example.response_token_ids == direct["choices"][0]["token_ids"]
    rollout = [entry["logprob"] for entry in direct["choices"][0]["logprobs"]["content"]]
    assert example.rollout_logprobs == pytest.approx(rollout, abs=1e-4)

    # The reply came after the swap: the very next request is served by the updated adapter.
    assert score(gw, lora_id, answer) != pytest.approx(before, abs=1e-3)
    assert steps(gw, lora_id) == 1
    record = json.loads(Path(body["feedback_log_path"]).read_text())
    assert record["status"] == "ok" and record["lora_id"] == lora_id and record["items"][0]["source"] == "cache"


def test_sleep_distill_wake_reload_order_against_the_server(feedback_gateway: Any) -> None:
    gw = feedback_gateway
    lora_id = new_lora(gw)
    since = len(gw.transport.calls)
    reply = feedback(gw, lora_id, "I am SmolLM, a helpful assistant.")
    assert reply.status_code == 200, reply.text
    assert reply.json()["sources"] == ["tokenized"]
    calls = [p for p in gw.transport.paths(since=since) if p in
             ("/sleep", "/wake_up", "/v1/unload_lora_adapter", "/v1/load_lora_adapter")]
    assert calls == ["/sleep", "/wake_up", "/v1/load_lora_adapter"]  # one in-place load: the name stays served
    assert "/metrics" in gw.transport.paths(since=since)  # drained before sleeping
    assert HTTP.get(f"{gw.model_server_url}/is_sleeping").json() == {"is_sleeping": False}


def test_server_is_asleep_during_the_step(feedback_gateway: Any) -> None:
    gw = feedback_gateway
    lora_id = new_lora(gw)
    seen: list[bool] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            seen.append(HTTP.get(f"{gw.model_server_url}/is_sleeping").json()["is_sleeping"])

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        assert feedback(gw, lora_id, "I am SmolLM.").status_code == 200
    finally:
        done.set()
        watcher.join()
    assert True in seen and seen[-1] is False


def test_concurrent_feedback_on_one_lora_applies_every_step_once(feedback_gateway: Any) -> None:
    gw = feedback_gateway
    lora_id = new_lora(gw, rank=4)

    async def send_all() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=900) as client:
            return await asyncio.gather(*[
                client.post(f"{gw.v1}/feedback", json={"lora_id": lora_id, "prompt": QUESTION,
                                                       "response": f"I am assistant number {i}.",
                                                       "feedback": FEEDBACK, "training": FAST})
                for i in range(8)
            ])

    replies = asyncio.run(send_all())
    oks = [r for r in replies if r.status_code == 200]
    assert len(oks) == 8, [r.text for r in replies if r.status_code != 200]
    assert sorted(r.json()["distill_result"]["step"] for r in oks) == list(range(1, 9))
    assert steps(gw, lora_id) == 8


def test_feedback_on_two_loras_runs_without_conflict(feedback_gateway: Any) -> None:
    gw = feedback_gateway
    first, second = new_lora(gw, rank=4), new_lora(gw, rank=4)

    async def send_both() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=900) as client:
            return await asyncio.gather(*[
                client.post(f"{gw.v1}/feedback", json={"lora_id": lora_id, "prompt": QUESTION,
                                                       "response": "I am SmolLM.", "feedback": FEEDBACK})
                for lora_id in (first, second)
            ])

    assert [r.status_code for r in asyncio.run(send_both())] == [200, 200]
    assert steps(gw, first) == steps(gw, second) == 1


def test_batch_form_trains_one_step_on_all_items(feedback_gateway: Any) -> None:
    gw = feedback_gateway
    lora_id = new_lora(gw, rank=4)
    item = {"lora_id": lora_id, "prompt": QUESTION, "feedback": FEEDBACK}
    reply = HTTP.post(f"{gw.v1}/feedback", json={
        "requests": [{**item, "response": "I am SmolLM."}, {**item, "response": "Hello, I'm an assistant."}]})
    assert reply.status_code == 200, reply.text
    assert reply.json()["batch_size"] == 2 and reply.json()["distill_result"]["step"] == 1


def test_distill_writes_a_version_and_leaves_the_adapter(feedback_gateway: Any) -> None:
    gw = feedback_gateway
    lora_id = new_lora(gw, rank=4)
    reply = HTTP.post(f"{gw.v1}/distill", json={
        "lora_id": lora_id, "prompt": QUESTION, "response": "I am SmolLM.", "feedback": FEEDBACK})
    assert reply.status_code == 200, reply.text
    version = reply.json()["distill_result"]["lora_id"]
    assert version.startswith(f"{lora_id}@")
    listed = {lora["lora_id"]: lora for lora in HTTP.get(f"{gw.v1}/lora", params={"prefix": lora_id}).json()["loras"]}
    assert listed[lora_id]["step"] == 0 and listed[version]["step"] == 1
    assert f"{lora_id}@latest" in listed[version]["aliases"]
    # A version is servable on demand: the proxy loads it when the server does not know it yet.
    assert chat(gw, version).choices[0].message.content


def test_export_zip_loads_on_the_model_server(feedback_gateway: Any, tmp_path: Path) -> None:
    gw = feedback_gateway
    lora_id = new_lora(gw, rank=4)
    assert feedback(gw, lora_id, "I am SmolLM.").status_code == 200
    reply = HTTP.get(f"{gw.v1}/lora/export", params={"lora_id": lora_id})
    assert reply.status_code == 200 and reply.headers["content-type"] == "application/zip"
    names = zipfile.ZipFile(io.BytesIO(reply.content)).namelist()
    assert "adapter_config.json" in names and "adapter_model.safetensors" in names
    assert "optimizer_state.pt" not in names
    zipfile.ZipFile(io.BytesIO(reply.content)).extractall(tmp_path / "exported")
    name = f"exported-{uuid.uuid4().hex[:6]}"
    load = HTTP.post(f"{gw.model_server_url}/v1/load_lora_adapter",
                      json={"lora_name": name, "lora_path": str(tmp_path / "exported")})
    assert load.status_code == 200, load.text
    assert score(gw, name, "I am SmolLM.") == pytest.approx(score(gw, lora_id, "I am SmolLM."), abs=1e-3)
    HTTP.post(f"{gw.model_server_url}/v1/unload_lora_adapter", json={"lora_name": name})


def test_delete_unloads_from_the_server(feedback_gateway: Any) -> None:
    gw = feedback_gateway
    lora_id = new_lora(gw, rank=4)
    reply = HTTP.delete(f"{gw.v1}/lora", params={"lora_id": lora_id})
    assert reply.status_code == 200 and reply.json()["deleted"] == lora_id
    served = [card["id"] for card in HTTP.get(f"{gw.model_server_url}/v1/models").json()["data"]]
    assert lora_id not in served
    assert HTTP.delete(f"{gw.v1}/lora", params={"lora_id": lora_id}).status_code == 404
    assert feedback(gw, lora_id, "x").status_code == 404


def test_error_paths(feedback_gateway: Any) -> None:
    gw = feedback_gateway
    missing = feedback(gw, "fb/never-created", "I am SmolLM.")
    assert missing.status_code == 404 and "does not exist" in missing.json()["error"]["message"]
    bad = feedback(gw, "../etc", "I am SmolLM.")
    assert bad.status_code == 422 and bad.json()["error"]["param"] == "lora_id"
    no_field = HTTP.post(f"{gw.v1}/feedback", json={"lora_id": "fb/x", "prompt": "p", "response": "r"})
    assert no_field.status_code == 422 and "feedback" in no_field.json()["error"]["message"]
    lora_id = new_lora(gw, rank=4)
    wrong_rollout = feedback(gw, lora_id, "I am SmolLM.", rollout_logprobs=[-1.0])
    assert wrong_rollout.status_code == 422 and "rollout_logprobs" in wrong_rollout.json()["error"]["message"]
    assert HTTP.get(f"{gw.model_server_url}/is_sleeping").json() == {"is_sleeping": False}
    unknown_completion = feedback(gw, lora_id, "I am SmolLM.", completion_id="chatcmpl-nope")
    assert unknown_completion.status_code == 404


def test_lock_timeout_is_409(feedback_gateway: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    gw = feedback_gateway
    lora_id = new_lora(gw, rank=4)
    monkeypatch.setattr(gw.settings, "feedback_lock_timeout_s", 0.5)
    with gw.engine.store.lock(lora_id, timeout=5):  # another process/thread is updating this adapter
        reply = feedback(gw, lora_id, "I am SmolLM.")
    assert reply.status_code == 409, reply.text
    assert "being updated" in reply.json()["error"]["message"]


def test_failure_in_a_phase_keeps_adapter_and_wakes_server(
    feedback_gateway: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    gw = feedback_gateway
    lora_id = new_lora(gw, rank=4)
    store = gw.engine.store
    before = {p.name: p.read_bytes() for p in store.snapshot_path(lora_id).iterdir()}

    def crash(directory: Path, name: str, optimizer: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(gw.engine.trainer, "_write_adapter", crash)
    reply = feedback(gw, lora_id, "I am SmolLM.")
    monkeypatch.undo()
    assert reply.status_code == 500
    error = reply.json()["error"]
    assert "distill" in error["message"] and "disk full" not in error["message"]  # the phase, not internals
    assert {p.name: p.read_bytes() for p in store.snapshot_path(lora_id).iterdir()} == before
    assert HTTP.get(f"{gw.model_server_url}/is_sleeping").json() == {"is_sleeping": False}
    logs = sorted(gw.settings.feedback_log_dir.rglob("*.json"), key=lambda p: p.stat().st_mtime)
    record = json.loads(logs[-1].read_text())
    assert record["status"] == "error" and record["error"]["phase"] == "distill" and record["lora_id"] == lora_id
    assert feedback(gw, lora_id, "I am SmolLM.").status_code == 200  # and it recovers


def test_health_reports_engine_and_server(feedback_gateway: Any) -> None:
    reply = HTTP.get(f"{feedback_gateway.v1}/health")
    assert reply.status_code == 200
    body = reply.json()
    assert body["inference"]["reachable"] is True and body["engine"]["engine"] == "local"
