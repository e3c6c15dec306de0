"""JSON shapes of vLLM's OpenAI responses, built from engine events (pure functions on dicts).

One function per shape: chat logprobs (`choices[i].logprobs.content[] = {token, logprob, bytes, top_logprobs}`), the
legacy completions logprobs (`{tokens, token_logprobs, top_logprobs, text_offset}`), `prompt_logprobs`
(`[null, {"<id>": {"logprob", "rank", "decoded_token"}}, ...]`, the actual token first, then the top-K), usage,
and the stream chunk envelopes. Logprobs below -9999 are clamped to -9999 as vLLM and OpenAI do.

Not here: the request flow (serving.py).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from claas.modelserver.prompts import token_strings

if TYPE_CHECKING:
    from claas.modelserver.engine import Engine
    from claas.modelserver.sampling import PositionLogprobs


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


@dataclass
class ChoiceState:
    """Accumulated output of one choice."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list["PositionLogprobs"] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
        "prompt_tokens_details": None,
    }


def _lp(value: float) -> float:
    return max(value, -9999.0)


def _ids_of(positions: list["PositionLogprobs | None"], top: int) -> list[int]:
    ids: list[int] = []
    for p in positions:
        if p is not None:
            ids.append(p.token_id)
            ids.extend(p.top_ids[:top])
    return ids


def chat_logprobs(engine: "Engine", positions: list["PositionLogprobs"], top: int) -> dict[str, Any]:
    strs = token_strings(engine, _ids_of(list(positions), top))

    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        token = strs[token_id]
        return {"token": token, "logprob": _lp(logprob), "bytes": list(token.encode("utf-8", errors="replace"))}

    content = []
    for p in positions:
        item = entry(p.token_id, p.logprob)
        item["top_logprobs"] = [entry(i, lp) for i, lp in zip(p.top_ids[:top], p.top_logprobs[:top])]
        content.append(item)
    return {"content": content}


def completion_logprobs(
    engine: "Engine",
    token_ids: list[int],
    positions: list["PositionLogprobs | None"],
    top: int,
    initial_offset: int = 0,
) -> dict[str, Any]:
    """Legacy shape; per token a dict of up to top+1 alternatives keyed by token text (the token itself first)."""
    strs = token_strings(engine, list(token_ids) + _ids_of(positions, top))
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    offsets: list[int] = []
    offset = initial_offset
    for token_id, p in zip(token_ids, positions):
        token = strs[token_id]
        tokens.append(token)
        offsets.append(offset)
        offset += len(token)
        if p is None:
            token_logprobs.append(None)
            top_logprobs.append(None)
            continue
        token_logprobs.append(_lp(p.logprob))
        alternatives = {token: _lp(p.logprob)}
        for i, lp in zip(p.top_ids[:top], p.top_logprobs[:top]):
            alternatives.setdefault(strs[i], _lp(lp))
        top_logprobs.append(alternatives)
    return {"text_offset": offsets, "token_logprobs": token_logprobs, "tokens": tokens, "top_logprobs": top_logprobs}


def prompt_logprobs(engine: "Engine", positions: list["PositionLogprobs | None"], top: int) -> list[Any]:
    strs = token_strings(engine, _ids_of(positions, top))
    out: list[Any] = []
    for p in positions:
        if p is None:
            out.append(None)
            continue
        entries = {str(p.token_id): {"logprob": _lp(p.logprob), "rank": p.rank, "decoded_token": strs[p.token_id]}}
        for rank, (i, lp) in enumerate(zip(p.top_ids[:top], p.top_logprobs[:top]), start=1):
            entries.setdefault(str(i), {"logprob": _lp(lp), "rank": rank, "decoded_token": strs[i]})
        out.append(entries)
    return out


def sse(data: dict[str, Any] | str) -> str:
    import json

    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"
