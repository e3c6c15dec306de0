"""Teacher side of SDPO: the hindsight prompt and scoring of the student's response under the teacher.

The teacher sees the same conversation as the student, except that the last user turn carries a hindsight block
with the user's feedback. It scores exactly the student's response token ids (never re-generated text).

Modes: `self` (the frozen base model with the adapter disabled, scored by the trainer, see `trainer.py`) and
`remote` (a larger model on a vLLM-compatible server, scored here through `/v1/completions` + `prompt_logprobs`).
Not here: the loss, optimizer, storage.
"""

from __future__ import annotations

import copy
import logging
import re
from dataclasses import dataclass
from typing import Any

import httpx
import torch

from claas.core.chat import message_text
from claas.core.types import FeedbackPlacement

logger = logging.getLogger(__name__)

HINDSIGHT_OPENING = "\n\n--- Later message from the user about your earlier answer to this request ---\n"
HINDSIGHT_CLOSING = "\n--- End of the later message. Answer the original request again with it in mind. ---"
#: `system` placement: replaces a model's built-in default system prompt only when the conversation has none.
SYSTEM_PREAMBLE = "You are a helpful AI assistant. "
SYSTEM_INSTRUCTION = "Follow this instruction from the user in every answer: "


class TeacherError(RuntimeError):
    """The remote teacher cannot be used (unreachable, different tokenizer, malformed answer)."""


def teacher_messages(
    messages: list[dict[str, Any]], feedback: str, placement: FeedbackPlacement = "user"
) -> list[dict[str, Any]]:
    """The student's messages with the feedback shown to the teacher: as a hindsight block appended to the last user
    turn (`user`, the reference's placement), or as a standing instruction in the system prompt (`system`: the
    teacher answers the request under the instruction instead of replying to the feedback, and none of the block's
    own wording can leak into its distribution)."""
    result = copy.deepcopy(messages)
    if placement == "system":
        note = SYSTEM_INSTRUCTION + feedback
        if result and result[0].get("role") == "system":
            result[0] = {**result[0], "content": message_text(result[0].get("content")) + "\n\n" + note}
        else:
            result.insert(0, {"role": "system", "content": SYSTEM_PREAMBLE + note})
        if not any(message.get("role") == "user" for message in result):
            raise ValueError("the conversation has no user message for the teacher to answer")
        return result
    for message in reversed(result):
        if message.get("role") == "user":
            message["content"] = message_text(message.get("content")) + HINDSIGHT_OPENING + feedback + HINDSIGHT_CLOSING
            return result
    raise ValueError("the conversation has no user message to attach the feedback to")


def chat_prompt_ids(tokenizer: Any, messages: list[dict[str, Any]]) -> list[int]:
    """Token ids of the rendered chat template with the generation prompt (a missing generation prompt makes the
    teacher predict a new user turn instead of the answer: strongly negative early-token signal)."""
    flat = [{**m, "content": message_text(m.get("content"))} for m in messages]
    encoded = tokenizer.apply_chat_template(flat, add_generation_prompt=True, tokenize=True, return_dict=True)
    return list(encoded["input_ids"])


_LOGPROBS_LIMIT = re.compile(r"greater than max allowed: (\d+)")


def _logprobs_limit(message: str) -> int | None:
    """The limit in vLLM's refusal "Requested prompt logprobs of 100, which is greater than max allowed: 20"."""
    match = _LOGPROBS_LIMIT.search(message)
    return int(match.group(1)) if match else None


@dataclass
class TopKTeacherScores:
    logprobs: torch.Tensor  # [T, K]
    ids: torch.Tensor  # [T, K]


class RemoteTeacher:
    """A vLLM-compatible server that scores the response under the hindsight prompt, returning top-K logprobs."""

    def __init__(self, base_url: str, model: str, *, api_key: str | None = None, timeout_s: float = 120.0) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout_s)
        self.model = model
        self._tokenizer_checked = False
        self.max_top_k: int | None = None  # the server's --max-logprobs, learnt from its first refusal

    def close(self) -> None:
        self._client.close()

    def check_tokenizer(self, tokenizer: Any) -> None:
        """Refuse a teacher whose tokenizer differs from the student's: token-level distillation needs one vocab."""
        probe = "Hello, world! Déjà vu: 12345 <tags> and emojis 🙂."
        local = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
        remote = self._post("/tokenize", {"model": self.model, "prompt": probe, "add_special_tokens": False})["tokens"]
        if remote != local:
            raise TeacherError(
                f"remote teacher {self.model!r} tokenizes differently from the student "
                f"(probe gave {remote[:8]}... vs {local[:8]}...); use a teacher of the same model family"
            )
        self._tokenizer_checked = True

    def score(self, prompt_ids: list[int], response_ids: list[int], top_k: int) -> TopKTeacherScores:
        """The teacher's top-K logprobs at each response position: [T, K] with K = `top_k`, or fewer when the
        server returns at most that many (vLLM's --max-logprobs, 20 by default); the teacher_topk loss takes any K."""
        if self.max_top_k is not None:
            top_k = min(top_k, self.max_top_k)
        body = {
            "model": self.model,
            "prompt": prompt_ids + response_ids,
            "max_tokens": 1,
            "prompt_logprobs": top_k,
            "temperature": 0.0,
        }
        try:
            reply = self._post("/v1/completions", body)
        except TeacherError as exc:
            limit = _logprobs_limit(str(exc))
            if limit is None or limit >= top_k or limit < 1:
                raise
            logger.info("remote teacher %s returns at most %d logprobs: using top-%d", self.model, limit, limit)
            self.max_top_k = limit
            return self.score(prompt_ids, response_ids, limit)
        positions = reply["choices"][0].get("prompt_logprobs")
        if not positions or len(positions) != len(prompt_ids) + len(response_ids):
            raise TeacherError("remote teacher returned no prompt_logprobs for every prompt position")
        logprob_rows, id_rows = [], []
        for entry in positions[len(prompt_ids) :]:
            ranked = sorted(entry.items(), key=lambda kv: kv[1]["rank"])[:top_k]
            if len(ranked) < top_k:
                raise TeacherError(f"remote teacher returned {len(ranked)} candidates, expected {top_k}")
            id_rows.append([int(token_id) for token_id, _ in ranked])
            logprob_rows.append([float(info["logprob"]) for _, info in ranked])
        return TopKTeacherScores(logprobs=torch.tensor(logprob_rows), ids=torch.tensor(id_rows, dtype=torch.long))

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        try:
            response = self._client.post(path, json=body)
        except httpx.HTTPError as exc:
            raise TeacherError(f"remote teacher at {self._client.base_url} unreachable: {exc}") from exc
        if response.status_code != 200:
            raise TeacherError(f"remote teacher {path} answered {response.status_code}: {response.text[:300]}")
        return response.json()
