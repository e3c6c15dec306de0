"""One SDPO step on SmolLM2 (CPU): resident engine vs the raw compute floor vs a cold per-call engine.

(a) LocalEngine.distill end to end (worker thread, tokenization, step, atomic save of adapter + optimizer state);
(b) the compute floor: teacher forward + student forward/backward + optimizer step, inline, nothing else;
(c) a cold per-call baseline: load the base model and the adapter from disk, step, save (a non-resident engine).
Prompt 64 / response 128 / feedback 24 tokens; median of >= 5 steps after a warm-up, all in this one run.
Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from peft import PeftModel

from claas.core.config import Settings, get_settings
from claas.core.models import load_model
from claas.core.types import DistillBatch, LoraInitRequest, TrainingConfig, TrainingExample
from claas.training.engine.local import LocalEngine
from claas.training.sdpo_loss import sdpo_loss
from claas.training.teacher import chat_prompt_ids, teacher_messages

LORA_ID = "bench/step"


def text_of_tokens(tokenizer, n: int, seed_text: str) -> str:
    """A text that tokenizes to exactly n tokens (repeat, then trim by tokens)."""
    ids = tokenizer(seed_text * (n // 4 + 8), add_special_tokens=False)["input_ids"][:n]
    text = tokenizer.decode(ids)
    assert len(tokenizer(text, add_special_tokens=False)["input_ids"]) in (n - 1, n, n + 1)
    return text


def make_example(tokenizer, prompt_tokens: int, response_tokens: int, feedback_tokens: int) -> TrainingExample:
    prompt = text_of_tokens(tokenizer, prompt_tokens - 20, "Explain how a bicycle gear system works in detail. ")
    response = text_of_tokens(tokenizer, response_tokens - 1, "Gears trade speed for force by changing ratios. ")
    feedback = text_of_tokens(tokenizer, feedback_tokens, "Please be much shorter and friendlier. ")
    return TrainingExample(messages=[{"role": "user", "content": prompt}], response_text=response, feedback=feedback)


def floor_step(model, tokenizer, example: TrainingExample, optimizer, cfg: TrainingConfig) -> None:
    prompt = chat_prompt_ids(tokenizer, example.messages)
    teacher_prompt = chat_prompt_ids(tokenizer, teacher_messages(example.messages, example.feedback))
    response = tokenizer(example.response_text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    t = len(response)
    with torch.no_grad(), model.disable_adapter():
        teacher = model(input_ids=torch.tensor([teacher_prompt + response]), logits_to_keep=t + 1).logits[0, :-1]
    student = model(input_ids=torch.tensor([prompt + response]), logits_to_keep=t + 1).logits[0, :-1]
    ids = torch.tensor(response)
    out = sdpo_loss(student_logits=student, response_ids=ids, response_mask=torch.ones_like(ids, dtype=torch.bool),
                    alpha=cfg.alpha, is_clip=cfg.is_clip, kl_reg_weight=0.0, top_k=cfg.teacher_top_k,
                    mode="student_topk", teacher_logits=teacher)
    out.loss.backward()
    params = [p for p in model.parameters() if p.requires_grad]
    torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--response-tokens", type=int, default=128)
    parser.add_argument("--feedback-tokens", type=int, default=24)
    parser.add_argument("--rank", type=int, default=32)
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="claas-bench-"))
    settings = Settings(lora_root=root / "loras", model_cache=get_settings().model_cache)
    engine = LocalEngine(settings)
    cfg = TrainingConfig(learning_rate=1e-4)

    async def resident() -> list[float]:
        await engine.warmup()
        await engine.init_lora(LoraInitRequest(lora_id=LORA_ID, lora_r=args.rank, lora_alpha=2 * args.rank))
        example = make_example(engine.trainer.tokenizer, args.prompt_tokens, args.response_tokens,
                               args.feedback_tokens)
        batch = DistillBatch(lora_id=LORA_ID, examples=[example], training=cfg)
        await engine.distill(batch)  # warm-up
        times = []
        for _ in range(args.steps):
            started = time.perf_counter()
            await engine.distill(batch)
            times.append(time.perf_counter() - started)
        return times

    resident_times = asyncio.run(resident())
    trainer = engine.trainer
    tokenizer = trainer.tokenizer
    example = make_example(tokenizer, args.prompt_tokens, args.response_tokens, args.feedback_tokens)
    hot = trainer._hot[LORA_ID]
    trainer._peft.set_adapter(hot.peft_name)
    floor_step(trainer._peft, tokenizer, example, hot.optimizer, cfg)  # warm-up
    floor_times = []
    for _ in range(args.steps):
        started = time.perf_counter()
        floor_step(trainer._peft, tokenizer, example, hot.optimizer, cfg)
        floor_times.append(time.perf_counter() - started)
    adapter_dir = settings.lora_root / LORA_ID
    asyncio.run(engine.close())
    trainer._hot.clear()

    cold_times = []
    for i in range(min(args.steps, 5) + 1):
        started = time.perf_counter()
        loaded = load_model(settings.base_model, settings.model_cache)
        model = PeftModel.from_pretrained(loaded.model, str(adapter_dir), is_trainable=True)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate)
        optimizer.load_state_dict(torch.load(adapter_dir / "optimizer_state.pt", weights_only=True))
        floor_step(model, loaded.tokenizer, example, optimizer, cfg)
        out = Path(tempfile.mkdtemp(prefix="claas-cold-"))
        model.save_pretrained(str(out))
        torch.save(optimizer.state_dict(), out / "optimizer_state.pt")
        if i > 0:  # first iteration is a warm-up (page cache)
            cold_times.append(time.perf_counter() - started)
        del model, loaded, optimizer

    a, b, c = (statistics.median(x) * 1000 for x in (resident_times, floor_times, cold_times))
    print(f"threads={torch.get_num_threads()} prompt={args.prompt_tokens} response={args.response_tokens} "
          f"feedback={args.feedback_tokens} rank={args.rank}")
    print(f"(a) resident LocalEngine.distill: median {a:.0f} ms  {[round(t * 1000) for t in resident_times]}")
    print(f"(b) compute floor:                median {b:.0f} ms  {[round(t * 1000) for t in floor_times]}")
    print(f"(c) cold per-call engine:         median {c:.0f} ms  {[round(t * 1000) for t in cold_times]}")
    print(json.dumps({"resident_ms": round(a, 1), "floor_ms": round(b, 1), "cold_ms": round(c, 1),
                      "resident_over_floor": round(a / b, 3), "cold_over_resident": round(c / a, 3),
                      "steps": args.steps, "rank": args.rank}))


if __name__ == "__main__":
    main()
