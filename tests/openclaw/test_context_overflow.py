"""CLAAS_CONTEXT_OVERFLOW=trim against the real model server (SmolLM2, 8192-token context, its own /tokenize):
the prompt of an OpenClaw-sized conversation is fitted by dropping the oldest turns, then shortening the system
prompt, with a visible marker; the last user turn is never changed; what cannot fit is left for the server's 400."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from claas.inference.context import ContextFitter, context_length
from claas.inference.vllm import VllmClient

pytestmark = pytest.mark.slow

QUESTION = {"role": "user", "content": "What is the capital of France?"}


def _words(n: int, word: str = "hello") -> str:
    return " ".join([word] * n)


class Server:
    """The fitter and a token counter on one event loop (httpx clients belong to the loop that opened them)."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url

    def fit(self, payload: dict[str, Any]) -> list[dict[str, Any]] | None:
        async def run() -> list[dict[str, Any]] | None:
            client = VllmClient(self.base_url)
            try:
                return await ContextFitter(client).fit(payload)
            finally:
                await client.aclose()
        return asyncio.run(run())

    def count(self, messages: list[dict[str, Any]]) -> int:
        async def run() -> int:
            client = VllmClient(self.base_url)
            try:
                return len(await client.tokenize_messages(messages, add_generation_prompt=True))
            finally:
                await client.aclose()
        return asyncio.run(run())

    def context(self) -> int | None:
        async def run() -> int | None:
            client = VllmClient(self.base_url)
            try:
                return await context_length(client, None)
            finally:
                await client.aclose()
        return asyncio.run(run())


@pytest.fixture(scope="module")
def server(model_server: Any) -> Server:
    return Server(model_server.base_url)


def test_the_server_reports_its_context(server: Server) -> None:
    assert server.context() == 8192


def test_oldest_turns_go_first_with_a_marker(server: Server) -> None:
    history = []
    for turn in range(12):
        history += [{"role": "user", "content": f"turn {turn}: " + _words(400)},
                    {"role": "assistant", "content": _words(300, "ok")}]
    messages = [{"role": "system", "content": "You are a personal assistant running inside OpenClaw."}, *history,
                QUESTION]
    assert server.count(messages) > 8192
    fitted = server.fit({"messages": messages, "max_completion_tokens": 16})
    assert fitted is not None
    assert server.count(fitted) <= 8192 - 16
    assert fitted[-1] == QUESTION and fitted[1]["role"] == "user"
    assert fitted[0]["content"].startswith("You are a personal assistant running inside OpenClaw.")
    assert "earlier message(s) were left out to fit the model's 8192-token context" in fitted[0]["content"]
    kept = [m["content"].split(":")[0] for m in fitted if m["role"] == "user" and m is not fitted[-1]]
    assert kept and kept[-1] == "turn 11" and "turn 0" not in kept  # the newest history stays


def test_a_system_prompt_too_long_is_shortened_visibly(server: Server) -> None:
    system = "Rules. " + _words(9000)
    messages = [{"role": "system", "content": system}, QUESTION]
    fitted = server.fit({"messages": messages, "max_tokens": 64})
    assert fitted is not None and server.count(fitted) <= 8192 - 64
    assert fitted[0]["content"].startswith("Rules. hello")
    assert fitted[0]["content"].endswith("the system prompt was shortened here to fit the model's 8192-token context.]")
    assert fitted[-1] == QUESTION


def test_what_fits_or_cannot_fit_is_left_alone(server: Server) -> None:
    assert server.fit({"messages": [QUESTION]}) is None
    alone = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": _words(9000)}]
    assert server.fit({"messages": alone}) is None  # the server's 400 will say so
