"""Gateway overhead: chat latency through `claas.api:web_app` vs direct to the model server, in one run.

    python benchmarks/bench_gateway.py [--requests 40] [--max-tokens 4] [--model smollm2-135m]

Starts `python -m claas.modelserver` and `uvicorn claas.api:web_app` (the real app, local engine, no access log) as
subprocesses on free 127.0.0.1 ports, then measures with one keep-alive httpx client per target:

- non-streamed chat (greedy, `max_tokens` small), gateway and direct interleaved A/B per prompt (order alternating)
  so that drift of the shared CPU cancels; `added_median_ms` is the median of the paired differences,
  `added_p95_ms` the difference of the p95s;
- time to first streamed chunk (first `data:` event with content), interleaved the same way (`added_ttfc_ms`);
- feedback -> next answer: `POST /v1/lora/init`, a chat with the adapter, `POST /v1/feedback` on that answer, then
  the next chat with the adapter; skipped with a note when the API has no `/v1/feedback`.

On a shared 2-core CPU the model's own latency jitter (several ms) swamps a ~1 ms overhead, so the same A/B is also
run against an instant stub upstream (canned vLLM-shaped JSON and SSE, no model) behind a second gateway process:
`isolated_added_median_ms` / `isolated_added_ttfc_ms` are the gateway's own cost without model noise.

The last line printed is one JSON object. Targets: added median <= 2 ms, added time-to-first-chunk <= 5 ms.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from claas.processes import ServiceStartError, free_port, stop_process, wait_until_healthy

PROMPTS = [
    "What is the capital of France?",
    "Name a primary colour.",
    "What is 2 + 2?",
    "Say hello in Spanish.",
    "What is the largest planet?",
    "Give me a synonym for happy.",
    "What language is spoken in Brazil?",
    "How many legs does a spider have?",
    "What is H2O?",
    "Name a fruit that is yellow.",
    "What is the opposite of cold?",
    "Which animal says moo?",
]


STUB_UPSTREAM = r"""
import json, sys
import uvicorn
from starlette.applications import Starlette
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

ids = list(range(100, 108))
lps = {"content": [{"token": "t", "logprob": -0.1, "bytes": [116], "top_logprobs": []} for _ in ids]}
reply = json.dumps({"id": "chatcmpl-stub", "object": "chat.completion", "created": 1, "model": "stub",
    "prompt_token_ids": list(range(40)), "usage": {"prompt_tokens": 40, "completion_tokens": 8, "total_tokens": 48},
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "The capital of France is Paris."},
                 "logprobs": lps, "finish_reason": "stop", "token_ids": ids}]}).encode()

def chunk(i):
    c = {"id": "chatcmpl-stub", "object": "chat.completion.chunk", "created": 1, "model": "stub",
         "choices": [{"index": 0, "delta": {"content": "tok "}, "token_ids": [ids[i]],
                      "logprobs": {"content": lps["content"][:1]}, "finish_reason": "stop" if i == 7 else None}]}
    if i == 0:
        c["prompt_token_ids"] = list(range(40))
    return b"data: " + json.dumps(c).encode() + b"\n\n"

async def chat(request):
    body = json.loads(await request.body())
    if body.get("stream"):
        async def events():
            for i in range(8):
                yield chunk(i)
            yield b"data: [DONE]\n\n"
        return StreamingResponse(events(), media_type="text/event-stream")
    return Response(reply, media_type="application/json")

async def health(request):
    return Response(b"")

app = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"]), Route("/health", health)])
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", access_log=False)
"""


def wait_healthy(url: str, process: subprocess.Popen, log: Path, timeout_s: float) -> None:
    try:
        wait_until_healthy(url, process, name=log.stem, timeout_s=timeout_s)
    except ServiceStartError as exc:
        raise RuntimeError(f"{exc}:\n{log.read_text()[-3000:]}") from exc


def start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with log.open("wb") as out:
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def chat_body(model: str, prompt: str, max_tokens: int, stream: bool = False) -> dict:
    return {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "temperature": 0,
        "max_tokens": max_tokens,
        "stream": stream,
    }


def timed_chat(client: httpx.Client, body: dict) -> float:
    start = time.perf_counter()
    response = client.post("/v1/chat/completions", json=body)
    elapsed = time.perf_counter() - start
    response.raise_for_status()
    return elapsed * 1000


def timed_first_chunk(client: httpx.Client, body: dict) -> float:
    start = time.perf_counter()
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        first = None
        for line in response.iter_lines():
            if first is None and line.startswith("data:") and '"content"' in line:
                first = (time.perf_counter() - start) * 1000
        if first is None:
            raise RuntimeError("stream had no content chunk")
        return first


def interleaved(fn, gateway: httpx.Client, direct: httpx.Client, bodies: list[dict]) -> tuple[list, list]:
    via, straight = [], []
    for i, body in enumerate(bodies):
        if i % 2 == 0:
            via.append(fn(gateway, body))
            straight.append(fn(direct, body))
        else:
            straight.append(fn(direct, body))
            via.append(fn(gateway, body))
    return via, straight


def compare(gateway_url: str, direct_url: str, bodies: list[dict], stream_tokens: int) -> dict[str, list[float]]:
    """Interleaved A/B of non-streamed latency and time to first chunk, after a short warm-up."""
    limits = httpx.Limits(max_keepalive_connections=4)
    with (
        httpx.Client(base_url=gateway_url, timeout=120, limits=limits, trust_env=False) as gateway,
        httpx.Client(base_url=direct_url, timeout=120, limits=limits, trust_env=False) as direct,
    ):
        interleaved(timed_chat, gateway, direct, bodies[:6])
        streams = [dict(body, stream=True, max_tokens=stream_tokens) for body in bodies]
        interleaved(timed_first_chunk, gateway, direct, streams[:4])
        via, straight = interleaved(timed_chat, gateway, direct, bodies)
        via_ttfc, straight_ttfc = interleaved(timed_first_chunk, gateway, direct, streams)
    return {"via": via, "direct": straight, "via_ttfc": via_ttfc, "direct_ttfc": straight_ttfc}


def paired_median(a: list[float], b: list[float]) -> float:
    return round(statistics.median([x - y for x, y in zip(a, b)]), 2)


def feedback_round_trip(gateway: httpx.Client, model: str, max_tokens: int) -> dict:
    paths = gateway.get("/openapi.json").json().get("paths", {})
    if "/v1/feedback" not in paths or "/v1/lora/init" not in paths:
        return {"skipped": "the API has no /v1/feedback or /v1/lora/init yet"}
    lora_id = f"bench/user-{os.getpid()}"
    init = gateway.post("/v1/lora/init", json={"lora_id": lora_id})
    if init.status_code != 200:
        return {"skipped": f"lora init failed: {init.status_code} {init.text[:300]}"}
    prompt = "Introduce yourself in one sentence."
    first = gateway.post("/v1/chat/completions", json=chat_body(lora_id, prompt, 24))
    first.raise_for_status()
    answer = first.json()["choices"][0]["message"]["content"]
    feedback = {
        "lora_id": lora_id,
        "prompt": prompt,
        "response": answer,
        "feedback": "Always introduce yourself as Kuro.",
        "completion_id": first.headers.get("x-claas-completion-id"),
    }
    start = time.perf_counter()
    response = gateway.post("/v1/feedback", json=feedback, timeout=600)
    feedback_ms = (time.perf_counter() - start) * 1000
    if response.status_code != 200:
        return {"skipped": f"feedback failed: {response.status_code} {response.text[:300]}"}
    next_start = time.perf_counter()
    gateway.post("/v1/chat/completions", json=chat_body(lora_id, prompt, max_tokens)).raise_for_status()
    done = time.perf_counter()
    gateway.request("DELETE", "/v1/lora", params={"lora_id": lora_id})
    return {
        "feedback_ms": round(feedback_ms, 1),
        "next_answer_ms": round((done - next_start) * 1000, 1),
        "feedback_to_answer_ms": round((done - start) * 1000, 1),
        "timing_ms": response.json().get("timing_ms"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=60, help="requests per target and measure (>= 30)")
    parser.add_argument("--max-tokens", type=int, default=2)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--skip-feedback", action="store_true")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="claas-bench-"))
    model_port, api_port, stub_port, stub_api_port = free_port(), free_port(), free_port(), free_port()
    model_url, api_url = f"http://127.0.0.1:{model_port}", f"http://127.0.0.1:{api_port}"
    stub_url, stub_api_url = f"http://127.0.0.1:{stub_port}", f"http://127.0.0.1:{stub_api_port}"
    env = {
        **os.environ,
        "CLAAS_VLLM_BASE_URL": model_url,
        "CLAAS_LORA_ROOT": str(work / "loras"),
        "CLAAS_FEEDBACK_LOG_DIR": str(work / "feedback"),
        "CLAAS_BASE_MODEL": args.model,
    }
    env.pop("CLAAS_API_KEYS", None)
    stub_env = {**env, "CLAAS_VLLM_BASE_URL": stub_url}

    def api_cmd(port: int) -> list[str]:
        return [sys.executable, "-m", "uvicorn", "claas.api:web_app", "--host", "127.0.0.1", "--port", str(port),
                "--log-level", "warning", "--no-access-log"]  # fmt: skip

    server_cmd = [sys.executable, "-m", "claas.modelserver", "--model", args.model, "--port", str(model_port)]
    processes = [start(server_cmd, env, work / "model-server.log")]
    bodies = [chat_body(args.model, PROMPTS[i % len(PROMPTS)], args.max_tokens) for i in range(args.requests)]
    try:
        wait_healthy(f"{model_url}/health", processes[0], work / "model-server.log", 300)
        stub = start([sys.executable, "-c", STUB_UPSTREAM, str(stub_port)], env, work / "stub.log")
        stub_api = start(api_cmd(stub_api_port), stub_env, work / "api-stub.log")
        processes += [stub, stub_api]
        wait_healthy(f"{stub_url}/health", stub, work / "stub.log", 60)
        wait_healthy(f"{stub_api_url}/metrics", stub_api, work / "api-stub.log", 120)
        isolated = compare(stub_api_url, stub_url, bodies, 8)
        for process in (stub_api, stub):
            stop_process(process)
            processes.remove(process)

        processes.append(start(api_cmd(api_port), env, work / "api.log"))
        wait_healthy(f"{api_url}/v1/models", processes[-1], work / "api.log", 120)
        real = compare(api_url, model_url, bodies, max(args.max_tokens, 8))
        feedback: dict = {"skipped": "--skip-feedback"}
        if not args.skip_feedback:
            try:
                with httpx.Client(base_url=api_url, timeout=120, trust_env=False) as gateway:
                    feedback = feedback_round_trip(gateway, args.model, args.max_tokens)
            except httpx.HTTPError as exc:
                feedback = {"skipped": f"feedback round trip failed: {exc!r}"}
    finally:
        for process in reversed(processes):
            stop_process(process)

    via, straight = real["via"], real["direct"]
    result = {
        "requests": args.requests,
        "max_tokens": args.max_tokens,
        "direct_median_ms": round(statistics.median(straight), 2),
        "gateway_median_ms": round(statistics.median(via), 2),
        "direct_p95_ms": round(percentile(straight, 0.95), 2),
        "gateway_p95_ms": round(percentile(via, 0.95), 2),
        "added_median_ms": paired_median(via, straight),
        "added_p95_ms": round(percentile(via, 0.95) - percentile(straight, 0.95), 2),
        "direct_ttfc_ms": round(statistics.median(real["direct_ttfc"]), 2),
        "gateway_ttfc_ms": round(statistics.median(real["via_ttfc"]), 2),
        "added_ttfc_ms": paired_median(real["via_ttfc"], real["direct_ttfc"]),
        "isolated_added_median_ms": paired_median(isolated["via"], isolated["direct"]),
        "isolated_added_p95_ms": round(percentile(isolated["via"], 0.95) - percentile(isolated["direct"], 0.95), 2),
        "isolated_added_ttfc_ms": paired_median(isolated["via_ttfc"], isolated["direct_ttfc"]),
        "target_added_median_ms": 2.0,
        "target_added_ttfc_ms": 5.0,
        "feedback": feedback,
    }
    result["meets_targets"] = result["added_median_ms"] <= 2.0 and result["added_ttfc_ms"] <= 5.0
    print(f"chat  direct median {result['direct_median_ms']} ms, gateway {result['gateway_median_ms']} ms, "
          f"added (paired median) {result['added_median_ms']} ms, added p95 {result['added_p95_ms']} ms")  # fmt: skip
    print(f"ttfc  direct median {result['direct_ttfc_ms']} ms, gateway {result['gateway_ttfc_ms']} ms, "
          f"added {result['added_ttfc_ms']} ms")  # fmt: skip
    print(f"isolated (stub upstream, no model): added median {result['isolated_added_median_ms']} ms, "
          f"p95 {result['isolated_added_p95_ms']} ms, ttfc {result['isolated_added_ttfc_ms']} ms")  # fmt: skip
    print(f"feedback -> next answer: {json.dumps(feedback)}")
    shutil.rmtree(work, ignore_errors=True)  # kept (with the servers' logs) only when the run failed
    print(json.dumps(result))


if __name__ == "__main__":
    main()
