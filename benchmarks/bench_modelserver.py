"""Decode speed of the model server vs a bare transformers `generate` loop, and time to first token.

    python benchmarks/bench_modelserver.py [--model smollm2-135m] [--max-tokens 128] [--reps 5] [--threads N]

One run, same model, same prompt token ids, same number of new tokens (greedy, EOS ignored), same torch thread count:
- the server (`python -m claas.modelserver`) in a subprocess: non-stream and stream `/v1/completions`; TTFT = time to
  the first streamed token;
- the bare baseline in this process: `model.generate(..., eos_token_id=None)` under `torch.inference_mode()`.
They take turns, never run at the same time (they would compete for the same cores): each repetition runs server
non-stream, bare, server stream back to back, after one warm-up of each. The headline figures are best-of-`--reps`
(the least-disturbed run; a shared machine's background load otherwise dominates), with the median of the
per-repetition ratios beside them. tokens/s counts new tokens over the whole request (prefill included) on both
sides. The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from claas.processes import ServiceStartError, free_port, stop_process, wait_until_healthy

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def _start_server(model: str, cache: Path, threads: int, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "CLAAS_MODEL_CACHE": str(cache)}
    cmd = [sys.executable, "-m", "claas.modelserver", "--model", model, "--port", str(port), "--cache-dir", str(cache)]
    with log.open("wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(f"{url}/health", proc, name="model server", timeout_s=300)
    except ServiceStartError as exc:
        stop_process(proc)
        raise SystemExit(f"{exc}:\n{log.read_text()[-4000:]}") from exc
    return proc, url


def _body(model: str, ids: list[int], max_tokens: int, stream: bool) -> dict:
    return {
        "model": model,
        "prompt": ids,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": stream,
        "return_token_ids": not stream,
    }


def _server_non_stream(client: httpx.Client, model: str, ids: list[int], n: int) -> tuple[float, list[int]]:
    start = time.perf_counter()
    r = client.post("/v1/completions", json=_body(model, ids, n, False))
    elapsed = time.perf_counter() - start
    r.raise_for_status()
    choice = r.json()["choices"][0]
    assert len(choice["token_ids"]) == n, choice
    return n / elapsed, choice["token_ids"]


def _server_stream(client: httpx.Client, model: str, ids: list[int], n: int) -> tuple[float, float]:
    start = time.perf_counter()
    first = None
    tokens = 0
    with client.stream("POST", "/v1/completions", json=_body(model, ids, n, True)) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            if first is None:
                first = time.perf_counter()
            tokens += 1  # one chunk per generated token
    elapsed = time.perf_counter() - start
    assert tokens == n and first is not None, tokens
    return n / elapsed, (first - start) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads on both sides (default: torch's)")
    args = parser.parse_args()

    import torch

    from claas.core.config import get_settings
    from claas.core.models import load_model

    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    cache = Path(os.environ.get("CLAAS_MODEL_CACHE") or get_settings().model_cache)
    n = args.max_tokens

    # The server and the bare loop take turns (never concurrently): one repetition runs server non-stream, server
    # stream and bare generate back to back, so a change in background load on a shared machine hits all three.
    log = Path(tempfile.mkdtemp(prefix="bench-modelserver-")) / "server.log"
    proc, url = _start_server(args.model, cache, threads, log)
    try:
        loaded = load_model(args.model, cache, "auto")
        with httpx.Client(base_url=url, timeout=600) as client:
            ids = client.post("/tokenize", json={"prompt": PROMPT}).json()["tokens"]
            x = torch.tensor([ids], device=loaded.device)

            def bare(new_tokens: int) -> tuple[float, list[int]]:
                with torch.inference_mode():
                    start = time.perf_counter()
                    out = loaded.model.generate(
                        x,
                        max_new_tokens=new_tokens,
                        do_sample=False,
                        eos_token_id=None,
                        pad_token_id=loaded.tokenizer.eos_token_id,
                    )
                    elapsed = time.perf_counter() - start
                generated = out[0, len(ids) :].tolist()
                assert len(generated) == new_tokens, len(generated)
                return new_tokens / elapsed, generated

            _server_non_stream(client, args.model, ids, 8)  # warm-ups
            _server_stream(client, args.model, ids, 8)
            bare(8)
            server_runs, stream_runs, bare_runs = [], [], []
            for rep in range(args.reps):
                server_runs.append(_server_non_stream(client, args.model, ids, n))
                bare_runs.append(bare(n))
                stream_runs.append(_server_stream(client, args.model, ids, n))
                print(
                    f"rep {rep + 1}: server {server_runs[-1][0]:.2f}  stream {stream_runs[-1][0]:.2f}  "
                    f"bare {bare_runs[-1][0]:.2f} tok/s  ttft {stream_runs[-1][1]:.1f} ms",
                    flush=True,
                )
    finally:
        stop_process(proc, timeout_s=30)
    # Best of N (the least-disturbed run, as timeit reports the minimum) is the headline; on a shared machine a
    # median mixes runs taken under different background load. The median of the per-repetition ratios (runs that
    # were adjacent in time) is reported beside it as a check.
    server_tok_s = max(r[0] for r in server_runs)
    stream_tok_s = max(r[0] for r in stream_runs)
    bare_tok_s = max(r[0] for r in bare_runs)
    ttft_ms = min(r[1] for r in stream_runs)
    pair_ratio = statistics.median(s[0] / b[0] for s, b in zip(server_runs, bare_runs))
    stream_pair_ratio = statistics.median(s[0] / b[0] for s, b in zip(stream_runs, bare_runs))
    same = bare_runs[0][1] == server_runs[0][1]
    print(f"server  non-stream: {server_tok_s:7.2f} tok/s (best of {args.reps}, {n} new tokens)")
    print(f"server  stream    : {stream_tok_s:7.2f} tok/s, time to first token {ttft_ms:.1f} ms (best)")
    print(f"bare    generate  : {bare_tok_s:7.2f} tok/s; same tokens as the server: {same}")
    print(f"median of per-repetition ratios: server/bare {pair_ratio:.3f}  stream/bare {stream_pair_ratio:.3f}")
    print(f"server/bare = {server_tok_s / bare_tok_s:.3f}   stream/bare = {stream_tok_s / bare_tok_s:.3f}")
    print(
        json.dumps(
            {
                "model": args.model,
                "device": str(loaded.device),
                "threads": threads,
                "max_tokens": n,
                "reps": args.reps,
                "prompt_tokens": len(ids),
                "bare_tok_s": round(bare_tok_s, 3),
                "server_tok_s": round(server_tok_s, 3),
                "stream_tok_s": round(stream_tok_s, 3),
                "ttft_ms": round(ttft_ms, 2),
                "server_over_bare": round(server_tok_s / bare_tok_s, 4),
                "stream_over_bare": round(stream_tok_s / bare_tok_s, 4),
                "server_over_bare_paired_median": round(pair_ratio, 4),
                "stream_over_bare_paired_median": round(stream_pair_ratio, 4),
                "ttft_ms_median": round(statistics.median(r[1] for r in stream_runs), 2),
                "same_tokens": same,
            }
        )
    )


if __name__ == "__main__":
    main()
