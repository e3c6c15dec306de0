"""The claas-feedback plugin's own logic, run under Node (its real module, imported by a small driver that plays the
gateway's part: it calls `register(api)`, fires the `llm_input` / `llm_output` hooks with the fields OpenClaw's SDK
declares, and invokes the `/feedback` handler) against a recording CLaaS stand-in on 127.0.0.1. The real gateway
drives it in test_openclaw_live.py; here the paths that need many turns or a failing CLaaS: batching, the fallback
when CLaaS forgot the completion, readable errors, turns of other providers."""

from __future__ import annotations

import json
import os
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from tests.openclaw.conftest import PLUGIN, OpenClawInstall

pytestmark = pytest.mark.slow

DRIVER = r"""
const [pluginPath, scenarioJson] = process.argv.slice(2);
const scenario = JSON.parse(scenarioJson);
const entry = (await import(pluginPath)).default;
const hooks = {};
let command;
entry.register({
  pluginConfig: scenario.config,
  logger: { info() {}, warn() {}, error() {}, debug() {} },
  on(name, handler) { hooks[name] = handler; },
  registerCommand(definition) { command = definition; },
});
for (const step of scenario.steps) {
  const ctx = { sessionKey: step.sessionKey, senderId: step.senderId };
  if (step.type === "turn") {
    hooks.llm_input({ runId: step.runId, sessionId: "s", provider: step.provider ?? "claas", model: step.model,
      systemPrompt: "SYSTEM", prompt: step.prompt, historyMessages: step.history ?? [], imagesCount: 0 }, ctx);
    hooks.llm_output({ runId: step.runId, sessionId: "s", provider: step.provider ?? "claas", model: step.model,
      assistantTexts: [step.response], lastAssistant: { role: "assistant", stopReason: "stop",
      content: [{ type: "text", text: step.response }], responseId: step.responseId } }, ctx);
  } else {
    const reply = await command.handler({ ...ctx, args: step.args, channel: "webchat", isAuthorizedSender: true,
      commandBody: `/feedback ${step.args}` });
    console.log(JSON.stringify(reply));
  }
}
"""


class FakeClaas:
    """Records each POST /v1/feedback body; answers with the queued responses (status, body), then 200s."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.responses: list[tuple[int, dict[str, Any]]] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                fake.bodies.append({"path": self.path, "auth": self.headers.get("authorization"), "body": body})
                items = body.get("requests") or [body]
                status, reply = fake.responses.pop(0) if fake.responses else (200, {
                    "lora_id": items[0]["lora_id"], "sources": ["cache"] * len(items), "timing_ms": {"total": 1500.0},
                    "distill_result": {"lora_id": items[0]["lora_id"], "step": 3, "metrics": {"loss": 0.25}}})
                data = json.dumps(reply).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"


@pytest.fixture
def claas() -> Iterator[FakeClaas]:
    fake = FakeClaas()
    thread = threading.Thread(target=fake.server.serve_forever, daemon=True)
    thread.start()
    try:
        yield fake
    finally:
        fake.server.shutdown()


@pytest.fixture(scope="module")
def driver(openclaw_install: OpenClawInstall, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Runs the plugin under Node; `openclaw/plugin-sdk/...` resolves to the installed OpenClaw."""
    root = tmp_path_factory.mktemp("plugin-driver")
    (root / "node_modules").mkdir()
    (root / "node_modules" / "openclaw").symlink_to(openclaw_install.entry.parent)
    (root / "plugin").mkdir()
    (root / "plugin" / "index.ts").write_text((PLUGIN / "index.ts").read_text())
    (root / "driver.mjs").write_text(DRIVER)

    def run(config: dict[str, Any], steps: list[dict[str, Any]]) -> list[dict[str, Any]]:
        result = subprocess.run(
            [str(openclaw_install.node), str(root / "driver.mjs"), str(root / "plugin" / "index.ts"),
             json.dumps({"config": config, "steps": steps})],
            capture_output=True, text=True, timeout=120, cwd=root, env={**os.environ, "NODE_NO_WARNINGS": "1"})
        assert result.returncode == 0, result.stderr
        return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]

    return run


def turn(session: str, n: int, **extra: Any) -> dict[str, Any]:
    return {"type": "turn", "sessionKey": session, "runId": f"run-{session}-{n}", "model": "alice/assistant",
            "prompt": f"[Tue 2026-12-01 23:30 UTC] question {n}", "response": f"answer {n}",
            "responseId": f"chatcmpl-{n}", **extra}


def feedback(session: str, text: str, **extra: Any) -> dict[str, Any]:
    return {"type": "command", "sessionKey": session, "args": text, **extra}


def test_feedback_sends_the_last_turn_of_this_conversation_with_its_completion_id(claas: FakeClaas,
                                                                                   driver: Any) -> None:
    replies = driver({"claasUrl": f"{claas.url}/v1", "apiKey": "k1", "training": {"learning_rate": 0.001}},
                     [turn("a", 1), turn("a", 2), turn("b", 3), feedback("a", "be brief")])
    assert claas.bodies[0]["path"] == "/v1/feedback" and claas.bodies[0]["auth"] == "Bearer k1"
    assert claas.bodies[0]["body"] == {
        "lora_id": "alice/assistant", "prompt": "[Tue 2026-12-01 23:30 UTC] question 2", "response": "answer 2",
        "feedback": "be brief", "completion_id": "chatcmpl-2", "training": {"learning_rate": 0.001}}
    assert replies[0]["text"] == ("Trained alice/assistant on 1 feedback item: step 3, loss 0.2500, 1.5 s "
                                  "(tokens from: cache).")


def test_batching_sends_n_items_as_one_step(claas: FakeClaas, driver: Any) -> None:
    replies = driver({"claasUrl": claas.url, "batchSize": 2},
                     [turn("a", 1), feedback("a", "first"), turn("a", 2), feedback("a", "second")])
    assert replies[0]["text"] == "Feedback queued (1/2); training after 2."
    assert len(claas.bodies) == 1
    items = claas.bodies[0]["body"]["requests"]
    assert [(i["completion_id"], i["feedback"]) for i in items] == [("chatcmpl-1", "first"), ("chatcmpl-2", "second")]
    assert replies[1]["text"].startswith("Trained alice/assistant on 2 feedback items: step 3")


def test_a_forgotten_completion_is_resent_with_the_full_messages(claas: FakeClaas, driver: Any) -> None:
    claas.responses.append((404, {"error": {"message": "completion 'chatcmpl-1' is not in the completion cache",
                                            "param": "completion_id"}}))
    history = [{"role": "user", "content": [{"type": "text", "text": "earlier"}]},
               {"role": "assistant", "content": "earlier answer"}, {"role": "toolResult", "content": "x"}]
    replies = driver({"claasUrl": claas.url}, [turn("a", 1, history=history), feedback("a", "shorter")])
    retry = claas.bodies[1]["body"]
    assert "completion_id" not in retry and retry["prompt"] == [
        {"role": "system", "content": "SYSTEM"}, {"role": "user", "content": "earlier"},
        {"role": "assistant", "content": "earlier answer"},
        {"role": "user", "content": "[Tue 2026-12-01 23:30 UTC] question 1"}]
    assert replies[0]["text"].startswith("Trained alice/assistant")


def test_errors_and_missing_turns_are_readable(claas: FakeClaas, driver: Any) -> None:
    claas.responses.append((409, {"error": {"message": "adapter 'alice/assistant' is busy with another update"}}))
    replies = driver({"claasUrl": claas.url},
                     [feedback("a", "x"), turn("a", 1, provider="openai"), feedback("a", "x"), feedback("a", ""),
                      turn("a", 2), feedback("a", "x")])
    assert replies[0]["text"].startswith("No answer from CLaaS in this chat yet")
    assert replies[1]["text"].startswith("No answer from CLaaS")  # another provider's turn is not ours to train
    assert replies[2]["text"] == "Usage: /feedback <what to do better>"
    assert replies[3]["text"] == (
        "Feedback not applied (HTTP 409): adapter 'alice/assistant' is busy with another update")


def test_an_unreachable_claas_is_said_so(driver: Any) -> None:
    replies = driver({"claasUrl": "http://127.0.0.1:9"}, [turn("a", 1), feedback("a", "x")])
    assert replies[0]["text"].startswith("Feedback not applied: CLaaS at http://127.0.0.1:9 is unreachable")
