"""TinkerEngine end to end on the fake Tinker cloud (real SmolLM2 logprobs): the maths, the token alignment, the
state file, failures, replicas, export and delete."""

from __future__ import annotations

import asyncio
import io
import json
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import tinker
import torch
from tinker_fakes import FakeTinkerCloud

from claas.core.types import DistillBatch, LoraInitRequest, TrainingConfig, TrainingExample
from claas.training.engine.remote_errors import RemoteEngineError
from claas.training.sdpo_loss import append_tail_bucket, generalized_jsd
from claas.training.storage import LoraNotFoundError
from claas.training.teacher import chat_prompt_ids, teacher_messages

pytestmark = pytest.mark.slow

MESSAGES = [{"role": "user", "content": "Who are you?"}]
FEEDBACK = "Your name is Kuro. Always introduce yourself as Kuro."


async def _served_example(engine: Any, lora_id: str, max_tokens: int = 10) -> TrainingExample:
    """An answer served by the adapter's sampler through the sampling backend: exact tokens + rollout logprobs."""
    inference = engine.inference_backend()
    ref = await engine.lora_runtime_ref(lora_id)
    await inference.reload_lora_adapter(ref.name, ref.path)
    reply = await inference.chat_completions(
        {"model": lora_id, "messages": MESSAGES, "max_tokens": max_tokens, "temperature": 0.0}
    )
    choice = reply["choices"][0]
    return TrainingExample(
        messages=MESSAGES, response_text=choice["message"]["content"], feedback=FEEDBACK,
        prompt_token_ids=reply["prompt_token_ids"], response_token_ids=choice["token_ids"],
        rollout_logprobs=[item["logprob"] for item in choice["logprobs"]["content"]], source="cache",
    )


def _reference_jsd(cloud: FakeTinkerCloud, example: TrainingExample, k: int, alpha: float) -> float:
    """The top-K + tail JSD computed directly on the model (adapter = base right after init)."""
    prompt, response = list(example.prompt_token_ids or []), list(example.response_token_ids or [])
    teacher_prompt = chat_prompt_ids(cloud.tokenizer, teacher_messages(example.messages, example.feedback))
    t = len(response)
    student = cloud.logprobs(None, prompt + response)[len(prompt) - 1 : len(prompt) - 1 + t]
    teacher = cloud.logprobs(None, teacher_prompt + response)[len(teacher_prompt) - 1 : len(teacher_prompt) - 1 + t]
    q_top, ids = teacher.topk(k, dim=-1)
    p_top = student.gather(-1, ids)
    jsd = generalized_jsd(append_tail_bucket(p_top.double()), append_tail_bucket(q_top.double()), alpha=alpha)
    return float(jsd.mean())


def test_one_step_runs_the_sdpo_maths_with_exact_token_alignment(
    make_tinker_engine: Callable[..., Any], tinker_cloud: FakeTinkerCloud
) -> None:
    engine = make_tinker_engine()
    cfg = TrainingConfig(learning_rate=1e-3, teacher_top_k=20, kl_reg_weight=0.1)

    async def run() -> tuple[Any, Any, Any, TrainingExample]:
        info = await engine.init_lora(LoraInitRequest(lora_id="alice/kuro"))
        before = await engine.lora_runtime_ref("alice/kuro")
        example = await _served_example(engine, "alice/kuro")
        result = await engine.distill(DistillBatch(lora_id="alice/kuro", examples=[example], training=cfg))
        return info, before, result, example

    info, before, result, example = asyncio.run(run())
    assert info.step == 0 and info.rank == 8
    metrics = result.metrics
    # Column 0 of the custom loss's logprobs equals the sampler's logprobs of the served tokens: ratio 1.
    assert metrics["is_ratio_mean"] == pytest.approx(1.0, abs=1e-4)
    # compute_logprobs (one value per token, first None) lines up with the student rows: k3 KL to base is 0 at init.
    assert metrics["kl_reg"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["tokens"] == len(example.response_token_ids or [])
    assert metrics["jsd"] == pytest.approx(_reference_jsd(tinker_cloud, example, 20, cfg.alpha), rel=1e-3)
    assert metrics["jsd"] > 0.0
    state = json.loads(engine.store.path.read_text())["loras"]["alice/kuro"]
    assert state["step"] == 1 and result.step == 1
    assert state["sampler_path"] != before.path and state["sampler_path"] in tinker_cloud.checkpoints
    assert state["state_path"] in tinker_cloud.checkpoints
    # The new sampler weights differ from the old: the served answer's logprobs moved.
    after_lps = tinker_cloud.checkpoints[state["sampler_path"]]["weights"]
    assert any(float(v.abs().sum()) > 0 for k, v in after_lps.items() if "lora_B" in k)


def test_a_failed_step_leaves_the_previous_checkpoint_current(
    make_tinker_engine: Callable[..., Any], tinker_cloud: FakeTinkerCloud
) -> None:
    engine = make_tinker_engine()
    example = TrainingExample(messages=MESSAGES, response_text="I am an AI assistant.", feedback=FEEDBACK)
    batch = DistillBatch(lora_id="bob/x", examples=[example], training=TrainingConfig(teacher_top_k=5))

    async def run() -> tuple[dict, dict, RemoteEngineError]:
        await engine.init_lora(LoraInitRequest(lora_id="bob/x"))
        saved = json.loads(engine.store.path.read_text())
        request = httpx.Request("POST", "https://tinker.test/api/v1/optim_step")
        tinker_cloud.fail_next["optim_step"] = tinker.APIConnectionError(request=request)
        with pytest.raises(RemoteEngineError) as caught:
            await engine.distill(batch)
        return saved, json.loads(engine.store.path.read_text()), caught.value

    saved, after, error = asyncio.run(run())
    assert after == saved
    assert error.status_code == 503 and "unreachable" in error.message
    assert "bob/x" not in engine._hot  # the half-stepped client is dropped; the next step restores the checkpoint


def test_replicas_sharing_the_state_file_never_step_a_stale_client(
    make_tinker_engine: Callable[..., Any], tinker_cloud: FakeTinkerCloud, tmp_path: Path
) -> None:
    first, second = make_tinker_engine(tmp_path / "shared"), make_tinker_engine(tmp_path / "shared")
    example = TrainingExample(messages=MESSAGES, response_text="Hello!", feedback=FEEDBACK)
    batch = DistillBatch(lora_id="carol/x", examples=[example], training=TrainingConfig(teacher_top_k=5))

    async def run() -> int:
        await first.init_lora(LoraInitRequest(lora_id="carol/x"))
        await second.distill(batch)  # step 1 by the other replica
        restores = tinker_cloud.calls.count("create_training_client_from_state_with_optimizer")
        result = await first.distill(batch)  # its hot client holds step 0: it must restore step 1
        assert tinker_cloud.calls.count("create_training_client_from_state_with_optimizer") == restores + 1
        return result.step

    assert asyncio.run(run()) == 2


def test_versions_export_and_delete(make_tinker_engine: Callable[..., Any], tinker_cloud: FakeTinkerCloud) -> None:
    engine = make_tinker_engine()
    example = TrainingExample(messages=MESSAGES, response_text="Hi.", feedback=FEEDBACK)

    async def run() -> tuple[str, bytes, list[str], list[str]]:
        await engine.init_lora(LoraInitRequest(lora_id="dave/x"))
        batch = DistillBatch(lora_id="dave/x", examples=[example], training=TrainingConfig(teacher_top_k=5),
                             save_mode="version")
        version = (await engine.distill(batch)).lora_id
        latest = await engine.lora_runtime_ref("dave/x@latest")
        assert latest.path == (await engine.lora_runtime_ref(version)).path
        data = await engine.export_lora("dave/x")
        listed = [info.lora_id for info in await engine.list_loras("dave/")]
        paths = [p for e in engine.store.list("dave/") for p in e.checkpoints]
        await engine.delete_lora("dave/x")
        return version, data, listed, paths

    version, data, listed, paths = asyncio.run(run())
    assert version.startswith("dave/x@") and listed == ["dave/x", version]
    names = zipfile.ZipFile(io.BytesIO(data)).namelist()
    assert "adapter_config.json" in names and "adapter_model.safetensors" in names
    assert engine.store.list("dave/") == []
    assert not any(path in tinker_cloud.checkpoints for path in paths)
    with pytest.raises(LoraNotFoundError):
        engine.store.get("dave/x")


def test_custom_loss_gradient_reaches_the_weights_as_the_sdk_sends_it() -> None:
    """The SDK's surrogate (cross-entropy with weights = -dL/dlogprobs) has the gradient of the loss itself."""
    from claas.training.engine.tinker_loss import TopKTailLossConfig, topk_tail_sdpo_loss

    torch.manual_seed(0)
    theta = torch.randn(6, 5, requires_grad=True)
    logprobs = theta.log_softmax(-1)[:, :4]  # column 0 + 3 candidates
    teacher = torch.randn(6, 3).log_softmax(-1) - 0.5
    mask = torch.tensor([0, 0, 1, 1, 1, 1.0])
    cfg = TopKTailLossConfig(alpha=0.5, is_clip=5.0)
    direct, _ = topk_tail_sdpo_loss(logprobs, teacher, mask, cfg)
    (expected,) = torch.autograd.grad(direct, theta)
    leaf = logprobs.detach().clone().requires_grad_(True)
    loss, _ = topk_tail_sdpo_loss(leaf, teacher, mask, cfg)
    loss.backward()
    assert leaf.grad is not None
    (surrogate_grad,) = torch.autograd.grad((theta.log_softmax(-1)[:, :4] * leaf.grad).sum(), theta)
    assert torch.allclose(surrogate_grad, expected, atol=1e-6)
