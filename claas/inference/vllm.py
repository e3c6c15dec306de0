"""VllmClient: an httpx client for vLLM-compatible servers (real vLLM or `claas model-server`).

Speaks only the HTTP API listed in shared/REFERENCE.md: chat/completions (JSON and SSE streams), `/v1/models`,
`/tokenize`, runtime LoRA load/unload, sleep/wake, `/metrics` (drain check) and `/health`.

Errors are translated once, here: a connection failure becomes `UpstreamUnavailableError` naming the URL (a timeout
`UpstreamTimeoutError`), a 404 `NotFoundError`, any other error status `UpstreamError` with the server's status, type
and message. Both error shapes are parsed (`{"error": {...}}` and the older flat `{"object": "error", ...}`).

Not here: retries, caching, choosing what to ask for; that is the proxy's job (`claas.inference.proxy`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from claas.errors import (
    ClaasError,
    NotFoundError,
    UpstreamError,
    UpstreamTimeoutError,
    UpstreamUnavailableError,
    parse_upstream_error,
)
from claas.inference.helpers import SseParser

logger = logging.getLogger(__name__)


class VllmClient:
    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        timeout_s: float = 300.0,
        transport: httpx.AsyncBaseTransport | None = None,
        inplace_reload: bool = True,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.inplace_reload = inplace_reload
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
        self._client = httpx.AsyncClient(
            base_url=self.base_url,
            headers=headers,
            timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 10.0)),
            limits=httpx.Limits(max_connections=512, max_keepalive_connections=64),
            transport=transport,
            # The inference server is normally on 127.0.0.1 or a compose network: an HTTP(S)_PROXY meant for the
            # outside world must not capture it.
            trust_env=False,
        )

    # --- generation ------------------------------------------------------------------------------------------------

    async def chat_completions(self, payload: dict[str, Any]) -> dict[str, Any]:
        return (await self._request("POST", "/v1/chat/completions", json=payload)).json()

    def stream_chat_completions(self, payload: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Parsed SSE chunks as the server sends them; closing the iterator closes the upstream response."""
        return self._stream("/v1/chat/completions", payload)

    async def completions(self, payload: dict[str, Any]) -> dict[str, Any]:
        return (await self._request("POST", "/v1/completions", json=payload)).json()

    def stream_completions(self, payload: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        return self._stream("/v1/completions", payload)

    async def models(self) -> list[dict[str, Any]]:
        return list((await self._request("GET", "/v1/models")).json().get("data", []))

    async def tokenize_messages(
        self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True, model: str | None = None
    ) -> list[int]:
        body: dict[str, Any] = {"messages": messages, "add_generation_prompt": add_generation_prompt}
        if model is not None:
            body["model"] = model
        return list((await self._request("POST", "/tokenize", json=body)).json()["tokens"])

    async def tokenize_text(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        body = {"prompt": text, "add_special_tokens": add_special_tokens}
        return list((await self._request("POST", "/tokenize", json=body)).json()["tokens"])

    # --- adapters --------------------------------------------------------------------------------------------------

    async def load_lora_adapter(self, name: str, path: str) -> None:
        """Load an adapter; the server answers 200 plain text. Already loaded → UpstreamError(400); no such path →
        NotFoundError."""
        await self._request("POST", "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path})

    async def unload_lora_adapter(self, name: str, *, missing_ok: bool = False) -> None:
        try:
            await self._request("POST", "/v1/unload_lora_adapter", json={"lora_name": name})
        except NotFoundError:
            if not missing_ok:
                raise
        except UpstreamError as exc:  # older vLLM: 400 "The lora adapter 'x' cannot be found."
            if not (missing_ok and exc.status_code == 400 and "found" in exc.message.lower()):
                raise

    async def reload_lora_adapter(self, name: str, path: str) -> None:
        """Serve the adapter at `path` under `name`, loaded or not.

        In place (vLLM's `load_inplace`, the default): one call, the name never stops being served, and the model
        server copies the new weights into the resident adapter between two requests. Otherwise unload (if loaded)
        then load, which gives the adapter a fresh id on vLLM (no stale prefix-cache blocks, vllm#42125) but leaves a
        window in which a request for `name` gets 404."""
        if self.inplace_reload:
            body = {"lora_name": name, "lora_path": path, "load_inplace": True}
            await self._request("POST", "/v1/load_lora_adapter", json=body)
            return
        await self.unload_lora_adapter(name, missing_ok=True)
        await self.load_lora_adapter(name, path)

    async def ensure_lora_adapter(self, name: str, path: str) -> None:
        """Load an adapter unless it is already loaded (a concurrent request may have just loaded it)."""
        try:
            await self.load_lora_adapter(name, path)
        except UpstreamError as exc:
            if exc.status_code != 400 or name not in {card.get("id") for card in await self.models()}:
                raise

    # --- sleep / drain / health ------------------------------------------------------------------------------------

    async def sleep(self, level: int = 1) -> None:
        await self._request("POST", "/sleep", params={"level": level})

    async def wake_up(self) -> None:
        await self._request("POST", "/wake_up")

    async def is_sleeping(self) -> bool:
        return bool((await self._request("GET", "/is_sleeping")).json().get("is_sleeping"))

    async def num_requests(self) -> tuple[int, int]:
        """(running, waiting) from the server's Prometheus `/metrics`, summed over label sets (model, engine)."""
        text = (await self._request("GET", "/metrics")).text
        totals = {"vllm:num_requests_running": 0.0, "vllm:num_requests_waiting": 0.0}
        for family in text_string_to_metric_families(text):
            if family.name in totals:
                totals[family.name] += sum(sample.value for sample in family.samples)
        return int(totals["vllm:num_requests_running"]), int(totals["vllm:num_requests_waiting"])

    async def wait_until_idle(self, timeout_s: float, poll_s: float = 0.05) -> None:
        """Return once no request is running or waiting; UpstreamTimeoutError after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while True:
            running, waiting = await self.num_requests()
            if running == 0 and waiting == 0:
                return
            if time.monotonic() >= deadline:
                raise UpstreamTimeoutError(
                    f"inference server at {self.base_url} still busy after {timeout_s:g}s "
                    f"({running} running, {waiting} waiting)"
                )
            await asyncio.sleep(poll_s)

    async def health(self) -> bool:
        try:
            await self._request("GET", "/health")
        except ClaasError:
            return False
        return True

    async def aclose(self) -> None:
        await self._client.aclose()

    # --- transport -------------------------------------------------------------------------------------------------

    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = await self._client.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise self._transport_error(exc, method, path) from exc
        if response.status_code >= 400:
            raise self._status_error(response.status_code, response.content, method, path)
        return response

    async def _stream(self, path: str, payload: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        request = self._client.build_request("POST", path, json=payload)
        try:
            response = await self._client.send(request, stream=True)
        except httpx.TransportError as exc:
            raise self._transport_error(exc, "POST", path) from exc
        try:
            if response.status_code >= 400:
                content = await response.aread()
                raise self._status_error(response.status_code, content, "POST", path)
            parser = SseParser()
            async for raw in response.aiter_bytes():
                for data in parser.feed(raw):
                    if data.strip() == "[DONE]":
                        return
                    yield json.loads(data)
            for data in parser.flush():
                if data.strip() != "[DONE]":
                    yield json.loads(data)
        except httpx.TransportError as exc:
            raise self._transport_error(exc, "POST", path) from exc
        finally:
            # Closing a response whose body was not read to the end drops the connection: the server sees the
            # disconnect and aborts the generation (this is how a client disconnect reaches vLLM).
            await response.aclose()

    def _transport_error(self, exc: httpx.TransportError, method: str, path: str) -> UpstreamUnavailableError:
        url = f"{self.base_url}{path}"
        detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if isinstance(exc, httpx.TimeoutException):
            return UpstreamTimeoutError(f"inference server timed out: {method} {url} ({detail})")
        return UpstreamUnavailableError(f"inference server unreachable: {method} {url} failed ({detail})")

    def _status_error(self, status: int, content: bytes, method: str, path: str) -> ClaasError:
        message, error_type, param = parse_upstream_error(status, content)
        logger.debug("upstream %s %s -> %d: %s", method, path, status, message)
        if status == 404:
            return NotFoundError(message, param=param)
        if status == 500:  # the server's internal error text (exception, paths) is for its own log, not callers
            logger.warning("inference server error from %s %s%s: %s", method, self.base_url, path, message)
            message = f"inference server error from {method} {self.base_url}{path} (HTTP 500; see its log)"
        elif status > 500:
            message = f"inference server error from {method} {self.base_url}{path}: {message}"
        return UpstreamError(status, message, upstream_type=error_type, param=param)
