"""The model server's speed: decode vs bare `generate` (fp32, bf16), concurrency, TTFT under load, adapter swap, and
feedback → first token of the next answer.

    python benchmarks/bench_modelserver.py [--max-tokens 64] [--reps 3] [--threads N] [--skip-feedback]

One run, same model, same prompt token ids, greedy, EOS ignored, same torch thread count on every side; the
subprocesses and the in-process baseline take turns, never run at the same time (they would compete for the cores):
- single stream, fp32: server non-stream `/v1/completions` vs bare `model.generate` (alternating, best of `--reps`,
  the paired-median ratio beside it); TTFT = time to the first streamed token;
- concurrency: 1/2/4/8/16 simultaneous non-stream requests, aggregate new tokens/s, and whether every greedy answer is
  the single-stream answer; TTFT of 8 simultaneous streams;
- bf16: the same server started with `--dtype bfloat16`: tok/s single and at 8 streams, and the prompt logprobs of
  one text against fp32;
- swap: a rank-32 adapter on every linear module; `load_inplace` of a second version (the gateway's reload) vs the
  old unload + load, median over repetitions;
- adapters: that adapter's tok/s alone and at 8 streams, and the base model's while it is loaded;
- feedback → answer: `claas api` (local engine) in front of the fp32 server: POST /v1/feedback, then at once a
  streamed chat on the adapter; the time to its first token over the step's own compute (teacher demonstration +
  forward/backward/optimizer, from the step's timing).
- llama.cpp (the same GGUF) when `llama_cpp` is importable; skipped with a message otherwise.
The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from claas.processes import ServiceStartError, free_port, stop_process, wait_until_healthy

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
SCORE_TEXT = "The lighthouse keeper walked down to the shore at dawn and found a green bottle in the sand."


def _start(cmd: list[str], env: dict[str, str], log: Path, health: str, name: str) -> subprocess.Popen:
    with log.open("wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
    try:
        wait_until_healthy(health, proc, name=name, timeout_s=300)
    except ServiceStartError as exc:
        stop_process(proc)
        raise SystemExit(f"{exc}:\n{log.read_text()[-4000:]}") from exc
    return proc


def _server(model: str, cache: Path, threads: int, dtype: str, work: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "CLAAS_MODEL_CACHE": str(cache)}
    cmd = [sys.executable, "-m", "claas.modelserver", "--model", model, "--port", str(port), "--cache-dir", str(cache)]
    cmd += ["--dtype", dtype]
    url = f"http://127.0.0.1:{port}"
    return _start(cmd, env, work / f"server-{dtype}.log", f"{url}/health", "model server"), url


def _body(model: str, ids: list[int], n: int, stream: bool) -> dict[str, Any]:
    return {"model": model, "prompt": ids, "max_tokens": n, "temperature": 0, "ignore_eos": True, "stream": stream,
            "return_token_ids": not stream}


def _non_stream(client: httpx.Client, model: str, ids: list[int], n: int) -> tuple[float, list[int]]:
    start = time.perf_counter()
    r = client.post("/v1/completions", json=_body(model, ids, n, False))
    elapsed = time.perf_counter() - start
    r.raise_for_status()
    tokens = r.json()["choices"][0]["token_ids"]
    assert len(tokens) == n, tokens
    return n / elapsed, tokens


def _ttft_ms(client: httpx.Client, model: str, ids: list[int], n: int) -> float:
    start = time.perf_counter()
    with client.stream("POST", "/v1/completions", json=_body(model, ids, n, True)) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                return (time.perf_counter() - start) * 1000
    raise AssertionError("no token streamed")


async def _concurrent(url: str, model: str, ids: list[int], n: int, streams: int) -> tuple[float, list[list[int]]]:
    async with httpx.AsyncClient(base_url=url, timeout=900) as client:
        start = time.perf_counter()
        replies = await asyncio.gather(
            *(client.post("/v1/completions", json=_body(model, ids, n, False)) for _ in range(streams))
        )
        elapsed = time.perf_counter() - start
    outs = [r.raise_for_status().json()["choices"][0]["token_ids"] for r in replies]
    return streams * n / elapsed, outs


async def _concurrent_ttft_ms(url: str, model: str, ids: list[int], n: int, streams: int) -> float:
    async with httpx.AsyncClient(base_url=url, timeout=900) as client:

        async def one() -> float:
            start = time.perf_counter()
            first = None
            async with client.stream("POST", "/v1/completions", json=_body(model, ids, n, True)) as r:
                async for line in r.aiter_lines():  # read to the end: the stream holds its place in the queue
                    if first is None and line.startswith("data: ") and line != "data: [DONE]":
                        first = (time.perf_counter() - start) * 1000
            assert first is not None, "no token streamed"
            return first

        return statistics.mean(await asyncio.gather(*(one() for _ in range(streams))))


def _prompt_logprobs(client: httpx.Client, model: str, ids: list[int]) -> list[float]:
    r = client.post("/v1/completions", json={"model": model, "prompt": ids, "max_tokens": 1, "prompt_logprobs": 0})
    rows = r.raise_for_status().json()["choices"][0]["prompt_logprobs"]
    return [row[str(t)]["logprob"] for row, t in zip(rows, ids) if row]


def _make_adapters(model: str, cache: Path, out: Path) -> list[str]:
    """Two versions of one rank-32 adapter on every linear module of the model (different seeds)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from claas.core.models import load_model

    paths = []
    for seed in (1, 2):
        loaded = load_model(model, cache, "cpu")
        torch.manual_seed(seed)
        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        config = LoraConfig(r=32, lora_alpha=64, target_modules=targets, init_lora_weights=False,
                            task_type="CAUSAL_LM")
        path = out / f"adapter-{seed}"
        get_peft_model(loaded.model, config).save_pretrained(str(path))
        paths.append(str(path))
    return paths


def _swap_times(client: httpx.Client, paths: list[str], reps: int) -> tuple[float, float]:
    """Median ms of an in-place load (alternating versions) and of the old unload + load."""
    name = "bench-swap"
    client.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": paths[0]}).raise_for_status()
    inplace, rebuild = [], []
    for i in range(reps * 3):
        start = time.perf_counter()
        body = {"lora_name": name, "lora_path": paths[(i + 1) % 2], "load_inplace": True}
        client.post("/v1/load_lora_adapter", json=body).raise_for_status()
        inplace.append((time.perf_counter() - start) * 1000)
    for i in range(reps):
        start = time.perf_counter()
        client.post("/v1/unload_lora_adapter", json={"lora_name": name}).raise_for_status()
        client.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": paths[i % 2]}).raise_for_status()
        rebuild.append((time.perf_counter() - start) * 1000)
    client.post("/v1/unload_lora_adapter", json={"lora_name": name})
    return statistics.median(inplace), statistics.median(rebuild)


def _adapter_speed(
    client: httpx.Client, url: str, model: str, path: str, ids: list[int], n: int, reps: int
) -> dict[str, float]:
    """tok/s of the rank-32 adapter (alone, at 8 streams) and of the base while it is loaded, against each other."""
    name = "bench-adapter"
    client.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path}).raise_for_status()
    try:
        _non_stream(client, name, ids, 8)
        adapter = max(_non_stream(client, name, ids, n)[0] for _ in range(reps))
        base = max(_non_stream(client, model, ids, n)[0] for _ in range(reps))
        adapter8, _ = asyncio.run(_concurrent(url, name, ids, n, 8))
    finally:
        client.post("/v1/unload_lora_adapter", json={"lora_name": name})
    return {
        "adapter_tok_s": round(adapter, 3),
        "base_tok_s_with_adapter_loaded": round(base, 3),
        "adapter_over_base": round(adapter / base, 4),
        "adapter_batch8_tok_s": round(adapter8, 3),
        "adapter_batch8_over_single": round(adapter8 / adapter, 4),
    }


def _feedback_to_answer(server_url: str, model: str, cache: Path, threads: int, work: Path, reps: int) -> dict:
    port = free_port()
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "CLAAS_MODEL_CACHE": str(cache),
        "CLAAS_VLLM_BASE_URL": server_url,
        "CLAAS_BASE_MODEL": model,
        "CLAAS_TRAINING_ENGINE": "local",
        "CLAAS_LORA_ROOT": str(work / "loras"),
        "CLAAS_FEEDBACK_LOG_DIR": str(work / "feedback-log"),
    }
    cmd = [sys.executable, "-m", "claas.cli", "api", "--port", str(port), "--log-level", "warning"]
    url = f"http://127.0.0.1:{port}"
    proc = _start(cmd, env, work / "api.log", f"{url}/v1/health", "claas api")
    lora_id = "bench/feedback"
    question = [{"role": "user", "content": "Hi! Who are you?"}]
    ratios, totals, steps = [], [], []
    phases: list[dict[str, float]] = []
    try:
        with httpx.Client(base_url=url, timeout=900) as client:
            client.post("/v1/lora/init", json={"lora_id": lora_id}).raise_for_status()
            for rep in range(reps + 1):  # the first is a warm-up
                body = {"lora_id": lora_id, "prompt": question[0]["content"], "response": "I am SmolLM.",
                        "feedback": "Your name is Kuro. Always introduce yourself as Kuro."}
                start = time.perf_counter()
                reply = client.post("/v1/feedback", json=body).raise_for_status().json()
                chat = {"model": lora_id, "messages": question, "max_tokens": 8, "temperature": 0, "stream": True}
                with client.stream("POST", "/v1/chat/completions", json=chat) as r:
                    r.raise_for_status()
                    for line in r.iter_lines():
                        if '"content":' in line and '"content": ""' not in line and '"content":""' not in line:
                            break
                first_token_ms = (time.perf_counter() - start) * 1000
                timing = reply["distill_result"].get("timing_ms") or {}
                step_ms = timing.get("compute", 0.0) + timing.get("demonstrate", 0.0)
                if rep == 0 or step_ms <= 0:
                    continue
                ratios.append(first_token_ms / step_ms)
                totals.append(first_token_ms)
                steps.append(step_ms)
                phases.append({**{f"gateway.{k}": v for k, v in reply["timing_ms"].items()},
                               **{f"step.{k}": v for k, v in timing.items()}})  # fmt: skip
    finally:
        stop_process(proc, timeout_s=30)
    if not ratios:
        return {"feedback_to_answer_over_step": None}
    return {
        "feedback_to_answer_over_step": round(statistics.median(ratios), 4),
        "feedback_to_first_token_ms": round(statistics.median(totals), 1),
        "step_compute_ms": round(statistics.median(steps), 1),
        "feedback_phases_ms": {k: round(statistics.median(p.get(k, 0.0) for p in phases), 1) for k in phases[0]},
    }


def _llama_cpp_tok_s(n: int, threads: int) -> float | None:
    try:
        llama_cpp = importlib.import_module("llama_cpp")  # optional: not a dependency of the project
    except ImportError:
        print("llama.cpp anchor skipped: llama_cpp (llama-cpp-python) is not importable")
        return None
    from claas.core.models import REGISTRY, gguf_path

    llm = llama_cpp.Llama(model_path=str(gguf_path(REGISTRY["smollm2-135m"])), n_threads=threads, verbose=False)
    llm(PROMPT, max_tokens=8)
    start = time.perf_counter()
    out = llm(PROMPT, max_tokens=n, temperature=0)
    return out["usage"]["completion_tokens"] / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads on every side (default: torch's)")
    parser.add_argument("--skip-feedback", action="store_true", help="skip the feedback → answer measurement")
    args = parser.parse_args()

    import torch

    from claas.core.config import get_settings
    from claas.core.models import load_model

    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    cache = Path(os.environ.get("CLAAS_MODEL_CACHE") or get_settings().model_cache)
    n, model = args.max_tokens, args.model
    work = Path(tempfile.mkdtemp(prefix="bench-modelserver-"))
    result: dict[str, Any] = {"model": model, "threads": threads, "max_tokens": n, "reps": args.reps}
    adapters = _make_adapters(model, cache, work)

    proc, url = _server(model, cache, threads, "float32", work)
    try:
        loaded = load_model(model, cache, "cpu")
        with httpx.Client(base_url=url, timeout=900) as client:
            ids = client.post("/tokenize", json={"prompt": PROMPT}).json()["tokens"]
            score_ids = client.post("/tokenize", json={"prompt": SCORE_TEXT}).json()["tokens"]
            x = torch.tensor([ids])

            def bare(new_tokens: int) -> tuple[float, list[int]]:
                with torch.inference_mode():
                    start = time.perf_counter()
                    out = loaded.model.generate(x, max_new_tokens=new_tokens, do_sample=False, eos_token_id=None,
                                                pad_token_id=loaded.tokenizer.eos_token_id)
                    elapsed = time.perf_counter() - start
                return new_tokens / elapsed, out[0, len(ids):].tolist()

            _non_stream(client, model, ids, 8), bare(8)  # warm-ups
            server_runs, bare_runs = [], []
            for rep in range(args.reps):
                server_runs.append(_non_stream(client, model, ids, n))
                bare_runs.append(bare(n))
                print(f"rep {rep + 1}: server {server_runs[-1][0]:.2f}  bare {bare_runs[-1][0]:.2f} tok/s", flush=True)
            ttft = min(_ttft_ms(client, model, ids, n) for _ in range(args.reps))
            single_tokens = server_runs[0][1]
            concurrency: dict[str, float] = {}
            same = True
            for streams in (1, 2, 4, 8, 16):
                tok_s, outs = asyncio.run(_concurrent(url, model, ids, n, streams))
                concurrency[str(streams)] = round(tok_s, 3)
                same = same and all(o == single_tokens for o in outs)
                print(f"{streams} concurrent: {tok_s:.2f} tok/s aggregate", flush=True)
            ttft_load = asyncio.run(_concurrent_ttft_ms(url, model, ids, n, 8))
            fp32_lps = _prompt_logprobs(client, model, score_ids)
            swap_ms, rebuild_ms = _swap_times(client, adapters, args.reps)
            print(f"swap: in place {swap_ms:.1f} ms, unload+load {rebuild_ms:.1f} ms", flush=True)
            adapter_speed = _adapter_speed(client, url, model, adapters[0], ids, n, args.reps)
            print(f"with the adapter loaded: {adapter_speed}", flush=True)
        server_tok_s = max(r[0] for r in server_runs)
        bare_tok_s = max(r[0] for r in bare_runs)
        result.update(
            bare_tok_s=round(bare_tok_s, 3),
            server_tok_s=round(server_tok_s, 3),
            server_over_bare=round(server_tok_s / bare_tok_s, 4),
            server_over_bare_paired_median=round(
                statistics.median(s[0] / b[0] for s, b in zip(server_runs, bare_runs)), 4
            ),
            same_tokens_as_bare=bare_runs[0][1] == single_tokens,
            ttft_ms=round(ttft, 2),
            concurrent_tok_s=concurrency,
            batch8_over_single=round(concurrency["8"] / concurrency["1"], 4),
            batch16_over_single=round(concurrency["16"] / concurrency["1"], 4),
            concurrent_greedy_identical=same,
            ttft_ms_8_streams=round(ttft_load, 2),
            swap_ms=round(swap_ms, 2),
            unload_load_ms=round(rebuild_ms, 2),
            **adapter_speed,
        )
        if not args.skip_feedback:
            result.update(_feedback_to_answer(url, model, cache, threads, work, args.reps))
    finally:
        stop_process(proc, timeout_s=30)

    proc, url = _server(model, cache, threads, "bfloat16", work)
    try:
        with httpx.Client(base_url=url, timeout=900) as client:
            _non_stream(client, model, ids, 8)
            bf16_runs = [_non_stream(client, model, ids, n) for _ in range(args.reps)]
            bf16_lps = _prompt_logprobs(client, model, score_ids)
            bf16_batch8, bf16_outs = asyncio.run(_concurrent(url, model, ids, n, 8))
    finally:
        stop_process(proc, timeout_s=30)
    bf16_tok_s = max(r[0] for r in bf16_runs)
    diffs = [abs(a - b) for a, b in zip(fp32_lps, bf16_lps)]
    result.update(
        bf16_tok_s=round(bf16_tok_s, 3),
        bf16_over_fp32=round(bf16_tok_s / result["server_tok_s"], 4),
        bf16_logprob_max_abs_diff=round(max(diffs), 5),
        bf16_logprob_mean_abs_diff=round(statistics.mean(diffs), 5),
        bf16_same_greedy_tokens=bf16_runs[0][1] == single_tokens,
        bf16_batch8_tok_s=round(bf16_batch8, 3),
        bf16_batch8_greedy_identical=all(o == bf16_runs[0][1] for o in bf16_outs),
    )
    anchor = _llama_cpp_tok_s(n, threads)
    result["llama_cpp_tok_s"] = None if anchor is None else round(anchor, 3)
    for key in ("server_over_bare", "batch8_over_single", "bf16_over_fp32", "swap_ms", "feedback_to_answer_over_step"):
        print(f"{key}: {result.get(key)}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
