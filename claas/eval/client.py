"""The harness's only way to the service: HTTP to a CLaaS gateway (and, optionally, chats through an OpenClaw
gateway's OpenAI-compatible endpoint). Secrets come from the environment, never from the config."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import httpx

COMPLETION_ID_HEADER = "X-Claas-Completion-Id"


class EvalClientError(RuntimeError):
    """The gateway answered with an error the harness cannot continue past."""


@dataclass
class ServedAnswer:
    text: str
    finish_reason: str | None
    completion_id: str | None
    #: per generated token, the top logprobs the server reported (empty unless asked for)
    top_logprobs: list[list[float]] = field(default_factory=list)


def _auth(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


class ClaasClient:
    def __init__(
        self,
        claas_url: str,
        *,
        timeout_s: float = 600.0,
        openclaw_url: str | None = None,
        openclaw_model: str | None = None,
    ) -> None:
        self._http = httpx.Client(
            base_url=claas_url.rstrip("/"), headers=_auth(os.environ.get("CLAAS_API_KEY")), timeout=timeout_s
        )
        self._chat_http = self._http
        self._openclaw_model = openclaw_model
        if openclaw_url:
            self._chat_http = httpx.Client(
                base_url=openclaw_url.rstrip("/"), headers=_auth(os.environ.get("OPENCLAW_TOKEN")), timeout=timeout_s
            )

    def close(self) -> None:
        self._http.close()
        if self._chat_http is not self._http:
            self._chat_http.close()

    # ---------------------------------------------------------------- adapters
    def lora_step(self, lora_id: str) -> int | None:
        """The adapter's step count, or None when it does not exist."""
        body = self._check(self._http.get("/v1/lora", params={"prefix": lora_id}))
        for lora in body["loras"]:
            if lora["lora_id"] == lora_id:
                return int(lora["step"])
        return None

    def init_lora(self, lora_id: str) -> dict[str, Any]:
        return self._check(self._http.post("/v1/lora/init", json={"lora_id": lora_id}))

    # ---------------------------------------------------------------- inference
    def chat(
        self,
        model: str,
        prompt: str,
        *,
        max_tokens: int,
        temperature: float,
        seed: int | None = None,
        n: int = 1,
        top_logprobs: int = 0,
    ) -> list[ServedAnswer]:
        body: dict[str, Any] = {
            "model": self._openclaw_model or model,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens,
            "temperature": temperature,
            "n": n,
        }
        if seed is not None:
            body["seed"] = seed
        if top_logprobs:
            body["logprobs"] = True
            body["top_logprobs"] = top_logprobs
        response = self._chat_http.post("/v1/chat/completions", json=body)
        reply = self._check(response)
        completion_id = response.headers.get(COMPLETION_ID_HEADER)
        answers = []
        for choice in reply["choices"]:
            content = (choice.get("logprobs") or {}).get("content") or []
            answers.append(
                ServedAnswer(
                    text=choice["message"].get("content") or "",
                    finish_reason=choice.get("finish_reason"),
                    completion_id=completion_id,
                    top_logprobs=[[float(t["logprob"]) for t in entry.get("top_logprobs", [])] for entry in content],
                )
            )
        return answers

    def score(self, model: str, prompt: str, completion: str) -> dict[str, Any]:
        body = {"model": model, "messages": [{"role": "user", "content": prompt}], "completion": completion}
        return self._check(self._http.post("/v1/score", json=body))

    # ---------------------------------------------------------------- feedback
    def feedback(
        self, lora_id: str, items: list[tuple[str, ServedAnswer]], feedback: str, training: dict[str, Any]
    ) -> dict[str, Any]:
        """One feedback request on exactly the answers that were served (by completion id when there is one)."""
        requests = []
        for prompt, answer in items:
            item: dict[str, Any] = {"lora_id": lora_id, "prompt": prompt, "response": answer.text, "feedback": feedback}
            if answer.completion_id:
                item["completion_id"] = answer.completion_id
            if training:
                item["training"] = training
            requests.append(item)
        body: dict[str, Any] = requests[0] if len(requests) == 1 else {"requests": requests}
        return self._check(self._http.post("/v1/feedback", json=body))

    @staticmethod
    def _check(response: httpx.Response) -> Any:
        if response.status_code >= 400:
            raise EvalClientError(f"{response.request.method} {response.request.url.path} answered "
                                  f"{response.status_code}: {response.text[:500]}")
        return response.json()
