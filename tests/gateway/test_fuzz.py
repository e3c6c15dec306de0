"""Fuzzing the gateway from its own OpenAPI schema (issue 8 proof), with schemathesis: every operation, a fixed seed,
generated cases sent to the real gateway (real local engine on the session trainer) in front of the real model
server. No answer may be a server error, and every answer must match the schema (status code documented, body valid
for it, content type declared). Then path traversal (`../`, percent-encoded, absolute, NUL, backslashes) in every
lora_id and path parameter: always a 4xx, and nothing is written outside the adapter root.

Generation is kept cheap: chat/completion cases get max_tokens 1 and n <= 2, lora/init cases rank <= 4 (the
generated values are otherwise kept). FUZZ_EXAMPLES cases per operation (>= 1,000 in all)."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, seed, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from claas.api import build_app
from claas.core.config import Settings
from claas.training.engine.local import LocalEngine
from tests.gateway.conftest import real_stack_settings

pytestmark = pytest.mark.slow

FUZZ_EXAMPLES = int(os.environ.get("CLAAS_FUZZ_EXAMPLES", "35"))  # per operation and phase; 15 operations
CHECKS = [not_a_server_error, status_code_conformance, response_schema_conformance, content_type_conformance]
CASES: Counter[str] = Counter()


class FuzzTarget:
    def __init__(self, base_url: str, root: Path, app: Any) -> None:
        self.base_url = base_url
        self.root = root
        self.app = app


@pytest.fixture(scope="module")
def fuzz_target(model_server: Any, trainer: Any, threaded_uvicorn: Any, tmp_path_factory: Any) -> Iterator[FuzzTarget]:
    root = tmp_path_factory.mktemp("fuzz")
    settings = real_stack_settings(model_server, trainer, root, feedback_lock_timeout_s=60.0)
    app = build_app(settings, engine=LocalEngine(settings, trainer=trainer))
    with threaded_uvicorn(app) as server:
        yield FuzzTarget(server.base_url, root, app)


# The schema the gateway serves at /openapi.json (the same for every app without API keys; building one is cheap).
schema = schemathesis.openapi.from_dict(build_app(Settings(_env_file=None)).openapi())  # type: ignore[call-arg]


def _cheap(case: Any) -> None:
    """Keep each case affordable on a CPU: one generated token, a rank-4 adapter at most."""
    body = case.body
    if not isinstance(body, dict):
        return
    if case.path in ("/v1/chat/completions", "/v1/completions"):
        body["max_tokens"] = 1
        body.pop("max_completion_tokens", None)
        if not isinstance(body.get("n"), int) or body["n"] > 2:
            body.pop("n", None)
    if case.path == "/v1/lora/init" and isinstance(body.get("lora_r"), int) and body["lora_r"] > 4:
        body["lora_r"] = 4


@schema.parametrize()
@seed(8)
@settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
def test_the_gateway_answers_every_generated_case_by_its_schema(case: Any, fuzz_target: FuzzTarget) -> None:
    _cheap(case)
    CASES[f"{case.operation.method.upper()} {case.operation.path}"] += 1
    case.call_and_validate(base_url=fuzz_target.base_url, checks=CHECKS, timeout=120)


def test_the_fuzzing_covered_every_operation_with_enough_cases(fuzz_target: FuzzTarget) -> None:
    operations = {f"{m.upper()} {p}" for p, ops in fuzz_target.app.openapi()["paths"].items() for m in ops}
    assert set(CASES) == operations, operations - set(CASES)
    total = sum(CASES.values())
    print(f"fuzzing: {total} cases over {len(CASES)} operations")
    assert total >= 1000


TRAVERSALS = ["../x", "../../etc/passwd", "..%2Fx", "%2e%2e/x", "/etc/passwd", "/tmp/x", "a\x00b", "alice/../../x",
              "alice/./x", "..", ".", "alice/..", "\\..\\x", "alice\\..\\x", "x/", "%00"]


def _outside(root: Path) -> set[Path]:
    """Everything in the directory above the adapter root (where a traversal out of it would write)."""
    return {p for p in root.parent.iterdir() if p != root}


@pytest.mark.parametrize("value", TRAVERSALS)
def test_path_traversal_in_every_lora_id_and_path_parameter_is_a_4xx(fuzz_target: FuzzTarget, value: str) -> None:
    root = Path(fuzz_target.app.state.settings.lora_root)
    before = _outside(root)
    body = {"prompt": "Hi", "response": "Hello.", "feedback": "Say Kuro."}
    quoted = "".join(c if c.isalnum() else f"%{ord(c):02X}" for c in value)
    calls: list[tuple[str, str, dict[str, Any]]] = [
        ("POST", "/v1/feedback", {"json": {**body, "lora_id": value}}),
        ("POST", "/v1/distill", {"json": {**body, "lora_id": value}}),
        ("POST", "/v1/feedback", {"json": {"requests": [{**body, "lora_id": value}]}}),
        ("POST", "/v1/lora/init", {"json": {"lora_id": value, "lora_r": 2}}),
        ("GET", "/v1/lora/export", {"params": {"lora_id": value}}),
        ("DELETE", "/v1/lora", {"params": {"lora_id": value}}),
        ("GET", "/v1/dashboard", {"params": {"lora_id": value}}),
        ("POST", "/v1/chat/completions", {"json": {"model": value, "max_tokens": 1,
                                                   "messages": [{"role": "user", "content": "Hi"}]}}),
        ("POST", "/v1/completions", {"json": {"model": value, "prompt": "Hi", "max_tokens": 1}}),
        ("POST", "/v1/score", {"json": {"model": value, "completion": "x",
                                        "messages": [{"role": "user", "content": "Hi"}]}}),
        ("GET", f"/v1/eval/{quoted}", {}),
        ("GET", f"/v1/eval/{quoted}/plots/x.png", {}),
        ("GET", f"/v1/eval/run/plots/{quoted}", {}),
    ]
    # Redirects followed: Starlette redirects `/x/` to `/x` (same origin), which then answers for itself.
    with httpx.Client(base_url=fuzz_target.base_url, timeout=120, follow_redirects=True) as client:
        for method, path, kwargs in calls:
            reply = client.request(method, path, **kwargs)
            assert 400 <= reply.status_code < 500, f"{method} {path} {value!r}: {reply.status_code} {reply.text[:200]}"
        listing = client.get("/v1/lora", params={"prefix": value})
        assert listing.status_code == 200 and listing.json()["loras"] == []  # a prefix is a filter, not a path
    assert _outside(root) == before
