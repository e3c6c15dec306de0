"""TinkerInference: the proxy's InferenceBackend on Tinker's sampler, so tinker mode needs no vLLM at all.

Chat requests are rendered with the base model's chat template (the tokenizer the sampler hands out), sampled with
`SamplingClient.sample`, and answered in vLLM's JSON shapes with exact `token_ids`, `prompt_token_ids` and per-token
logprobs, so the completion cache and the feedback path work unchanged. Each adapter name routes to a sampler path
(`tinker://.../sampler_weights/...`); "loading" an adapter is pointing its name at a path, so the feedback
transaction's unload -> load swaps the proxy to the new weights. Tinker does not stream: a stream is the finished
sample replayed as one chunk per token (first byte arrives when the sample is done).

Not supported (400): `echo`, `prompt_logprobs` on chat, tools. Sleep/wake are no-ops (nothing to free).
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import Any

from claas.core.chat import message_text
from claas.errors import InvalidRequestError, NotFoundError
from claas.training.engine.remote_errors import tinker_errors

logger = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 1024
SAMPLER_CACHE = 64


class TinkerSamplers:
    """Sampling clients by model path (None = the base model), created once each (LRU), and the tokenizer."""

    def __init__(self, service: Any, base_model: str) -> None:
        self.service = service
        self.base_model = base_model
        self._clients: OrderedDict[str, Any] = OrderedDict()
        self._tokenizer: Any = None
        self._guard = asyncio.Lock()

    async def client(self, model_path: str | None = None) -> Any:
        key = model_path or f"base:{self.base_model}"
        async with self._guard:
            found = self._clients.get(key)
            if found is None:
                with tinker_errors("creating a sampling client"):
                    if model_path is None:
                        found = await self.service.create_sampling_client(base_model=self.base_model)
                    else:
                        found = await self.service.create_sampling_client(model_path=model_path)
                self._clients[key] = found
                while len(self._clients) > SAMPLER_CACHE:
                    self._clients.popitem(last=False)
            self._clients.move_to_end(key)
            return found

    async def tokenizer(self) -> Any:
        if self._tokenizer is None:
            base = await self.client(None)
            self._tokenizer = await asyncio.to_thread(base.get_tokenizer)
        return self._tokenizer


class TinkerInference:
    """vLLM's HTTP API subset the gateway uses, answered by Tinker's sampler."""

    def __init__(self, samplers: TinkerSamplers, *, served_name: str | None = None) -> None:
        self.samplers = samplers
        self.base_url = "tinker://sampler"
        self.served_name = served_name or samplers.base_model
        self._routes: dict[str, str] = {}  # adapter name -> sampler path

    # --- generation ------------------------------------------------------------------------------------------------

    async def chat_completions(self, payload: dict[str, Any]) -> dict[str, Any]:
        _refuse(payload, ("tools", "prompt_logprobs", "echo"))
        prompt_ids = await self.tokenize_messages(payload["messages"], add_generation_prompt=True)
        sequences, name = await self._sample(payload, prompt_ids)
        tokenizer = await self.samplers.tokenizer()
        choices = []
        for index, seq in enumerate(sequences):
            text = tokenizer.decode(_visible(seq.tokens, tokenizer), skip_special_tokens=True)
            choices.append({
                "index": index,
                "message": {"role": "assistant", "content": text},
                "logprobs": {"content": _chat_logprobs(tokenizer, seq.tokens, seq.logprobs or [])},
                "finish_reason": seq.stop_reason,
                "token_ids": list(seq.tokens),
            })
        return _envelope("chat.completion", name, choices, prompt_ids, sequences) | {"prompt_token_ids": prompt_ids}

    async def stream_chat_completions(self, payload: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        reply = await self.chat_completions(payload)
        tokenizer = await self.samplers.tokenizer()
        base = {"id": reply["id"], "object": "chat.completion.chunk", "created": reply["created"],
                "model": reply["model"]}
        yield base | {"prompt_token_ids": reply["prompt_token_ids"],
                      "choices": [{"index": c["index"], "delta": {"role": "assistant", "content": ""}}
                                  for c in reply["choices"]]}
        for choice in reply["choices"]:
            ids, entries = choice["token_ids"], choice["logprobs"]["content"]
            for position, token_id in enumerate(ids):
                text = _piece(tokenizer, ids, position)
                yield base | {"choices": [{"index": choice["index"], "delta": {"content": text},
                                           "logprobs": {"content": [entries[position]]}, "token_ids": [token_id],
                                           "finish_reason": None}]}
            last = {"index": choice["index"], "delta": {}, "finish_reason": choice["finish_reason"]}
            yield base | {"choices": [last]}
        options = payload.get("stream_options") or {}
        if options.get("include_usage"):
            yield base | {"choices": [], "usage": reply["usage"]}

    async def completions(self, payload: dict[str, Any]) -> dict[str, Any]:
        _refuse(payload, ("echo",))
        prompt = payload.get("prompt")
        if isinstance(prompt, str):
            prompt_ids = await self.tokenize_text(prompt, add_special_tokens=True)
        elif isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            prompt_ids = list(prompt)
        else:
            raise InvalidRequestError("the tinker sampler takes one prompt (a string or token ids)", param="prompt")
        top = payload.get("prompt_logprobs")
        sequences, name, response = await self._sample(payload, prompt_ids, prompt_topk=top, full=True)
        tokenizer = await self.samplers.tokenizer()
        choices = []
        for index, seq in enumerate(sequences):
            lps = list(seq.logprobs or [])
            choice: dict[str, Any] = {
                "index": index,
                "text": tokenizer.decode(_visible(seq.tokens, tokenizer), skip_special_tokens=True),
                "logprobs": {"tokens": [tokenizer.decode([t]) for t in seq.tokens], "token_logprobs": lps,
                             "top_logprobs": [None] * len(lps), "text_offset": [0] * len(lps)},
                "finish_reason": seq.stop_reason,
                "token_ids": list(seq.tokens),
                "prompt_token_ids": prompt_ids,
            }
            if top is not None:
                choice["prompt_logprobs"] = _prompt_logprobs(tokenizer, prompt_ids, response)
            choices.append(choice)
        return _envelope("text_completion", name, choices, prompt_ids, sequences)

    async def stream_completions(self, payload: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        reply = await self.completions(payload)
        for choice in reply["choices"]:
            yield {k: reply[k] for k in ("id", "object", "created", "model")} | {"choices": [choice]}

    async def _sample(
        self, payload: dict[str, Any], prompt_ids: list[int], *, prompt_topk: int | None = None, full: bool = False
    ) -> Any:
        from tinker import types

        name = payload.get("model") or self.served_name
        client = await self.samplers.client(self._model_path(name))
        params = types.SamplingParams(
            max_tokens=payload.get("max_completion_tokens") or payload.get("max_tokens") or DEFAULT_MAX_TOKENS,
            temperature=1.0 if payload.get("temperature") is None else float(payload["temperature"]),
            top_p=float(payload.get("top_p") or 1.0),
            top_k=int(payload.get("top_k") or -1),
            seed=payload.get("seed"),
            stop=payload.get("stop"),
        )
        with tinker_errors("sampling"):
            response = await client.sample(
                prompt=types.ModelInput.from_ints(prompt_ids),
                num_samples=int(payload.get("n") or 1),
                sampling_params=params,
                include_prompt_logprobs=prompt_topk is not None,
                topk_prompt_logprobs=int(prompt_topk or 0),
            )
        return (response.sequences, name, response) if full else (response.sequences, name)

    def _model_path(self, name: str) -> str | None:
        if name in self._routes:
            return self._routes[name]
        if name in (self.served_name, self.samplers.base_model):
            return None
        raise NotFoundError(f"The model `{name}` does not exist.", param="model")

    async def models(self) -> list[dict[str, Any]]:
        cards = [{"id": self.served_name, "object": "model", "owned_by": "tinker", "root": self.samplers.base_model,
                  "parent": None}]
        cards += [{"id": name, "object": "model", "owned_by": "tinker", "root": path, "parent": self.served_name}
                  for name, path in sorted(self._routes.items())]
        return cards

    async def tokenize_messages(
        self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True, model: str | None = None
    ) -> list[int]:
        tokenizer = await self.samplers.tokenizer()
        flat = [{**m, "content": message_text(m.get("content"))} for m in messages]
        encoded = tokenizer.apply_chat_template(
            flat, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=True
        )
        return list(encoded["input_ids"])

    async def tokenize_text(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        tokenizer = await self.samplers.tokenizer()
        return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    # --- adapters: a name points at a sampler path -----------------------------------------------------------------

    async def load_lora_adapter(self, name: str, path: str) -> None:
        await self.samplers.client(path)  # fail here, not on the next chat, when the path is unusable
        self._routes[name] = path

    async def unload_lora_adapter(self, name: str, *, missing_ok: bool = False) -> None:
        if self._routes.pop(name, None) is None and not missing_ok:
            raise NotFoundError(f"The lora adapter '{name}' cannot be found.")

    async def reload_lora_adapter(self, name: str, path: str) -> None:
        await self.load_lora_adapter(name, path)

    async def ensure_lora_adapter(self, name: str, path: str) -> None:
        await self.load_lora_adapter(name, path)

    # --- sleep / drain / health: nothing runs here -----------------------------------------------------------------

    async def sleep(self, level: int = 1) -> None:
        return None

    async def wake_up(self) -> None:
        return None

    async def is_sleeping(self) -> bool:
        return False

    async def num_requests(self) -> tuple[int, int]:
        return 0, 0

    async def wait_until_idle(self, timeout_s: float, poll_s: float = 0.05) -> None:
        return None

    async def health(self) -> bool:
        return True

    async def aclose(self) -> None:
        return None


def _refuse(payload: dict[str, Any], fields: tuple[str, ...]) -> None:
    for name in fields:
        if payload.get(name):
            raise InvalidRequestError(f"`{name}` is not supported by the tinker sampling backend", param=name)


def _visible(tokens: Any, tokenizer: Any) -> list[int]:
    eos = tokenizer.eos_token_id
    ids = list(tokens)
    return ids[:-1] if ids and ids[-1] == eos else ids


def _piece(tokenizer: Any, ids: list[int], position: int) -> str:
    """The text token `position` adds (decoding prefixes, so multi-byte characters split across tokens come out
    whole once complete)."""
    visible = _visible(ids, tokenizer)
    if position >= len(visible):
        return ""
    before = tokenizer.decode(visible[:position], skip_special_tokens=True)
    return tokenizer.decode(visible[: position + 1], skip_special_tokens=True)[len(before):]


def _chat_logprobs(tokenizer: Any, tokens: Any, logprobs: Any) -> list[dict[str, Any]]:
    out = []
    for token_id, logprob in zip(tokens, logprobs):
        text = tokenizer.decode([token_id])
        out.append({"token": text, "logprob": max(float(logprob), -9999.0),
                    "bytes": list(text.encode("utf-8", errors="replace")), "top_logprobs": []})
    return out


def _prompt_logprobs(tokenizer: Any, prompt_ids: list[int], response: Any) -> list[Any]:
    """vLLM's `prompt_logprobs`: per position {id: {logprob, rank, decoded_token}}, the actual token first."""
    actual = response.prompt_logprobs or [None] * len(prompt_ids)
    topk = response.topk_prompt_logprobs or [None] * len(prompt_ids)
    out: list[Any] = []
    for position, token_id in enumerate(prompt_ids):
        value = actual[position]
        if value is None:
            out.append(None)
            continue
        ranked = list(topk[position] or [])
        rank = next((r for r, (i, _) in enumerate(ranked, start=1) if i == token_id), len(ranked) + 1)
        entry = {str(token_id): {"logprob": float(value), "rank": rank,
                                 "decoded_token": tokenizer.decode([token_id])}}
        for r, (i, lp) in enumerate(ranked, start=1):
            entry.setdefault(str(i), {"logprob": float(lp), "rank": r, "decoded_token": tokenizer.decode([i])})
        out.append(entry)
    return out


def _envelope(obj: str, model: str, choices: list[dict[str, Any]], prompt_ids: list[int], sequences: Any) -> dict:
    import time
    import uuid

    completion_tokens = sum(len(seq.tokens) for seq in sequences)
    prefix = "chatcmpl" if obj == "chat.completion" else "cmpl"
    return {
        "id": f"{prefix}-{uuid.uuid4().hex}",
        "object": obj,
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": {"prompt_tokens": len(prompt_ids), "completion_tokens": completion_tokens,
                  "total_tokens": len(prompt_ids) + completion_tokens},
    }
