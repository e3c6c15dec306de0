"""The dashboard routes through the real app (`build_app`, lifespan included): HTML content, paging links, the adapter
filter, 422s naming the field, API-key scopes, eval pages and plots, and path traversal (also as raw request lines
sent to a real uvicorn server, which no client normalizes)."""

from __future__ import annotations

import http.client
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from claas.api import build_app

Writer = Callable[..., dict[str, Any]]
RunWriter = Callable[..., Path]
ADMIN, ALICE = "admin-key-0123", "alice-key-4567"
KEYS = f"{ADMIN},{ALICE}:alice/"


def _records(html: str) -> list[str]:
    """The lora_id of every record on a dashboard page, in page order."""
    return re.findall(r'<details class="card record" id="[^"]*" data-lora-id="([^"]*)"', html)


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_dashboard_shows_every_part_of_a_record(data, make_client, write_record: Writer) -> None:
    write_record(data.log_dir, "alice/a", feedback="Please answer in one word.", response="The capital is Paris.")
    with make_client() as client:
        response = client.get("/v1/dashboard")

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in response.headers["content-security-policy"]
    html = response.text
    assert '<meta name="viewport" content="width=device-width, initial-scale=1">' in html
    assert _records(html) == ["alice/a"]
    for text in ("Please answer in one word.", "The capital is Paris.", "What is the capital of France?",
                 "trained on", "tokenized", "Loss metrics", "0.4321", "Timings", "340.5 ms", "trainer: compute",
                 "Server orchestration", "slept", "woke", "Records 1–1 of 1"):
        assert text in html, text


def test_fields_the_dashboard_does_not_know_are_shown(data, make_client) -> None:
    day = data.log_dir / "2026-01-02"
    day.mkdir(parents=True)
    (day / "120000000000-abc.json").write_text(json.dumps({
        "request_id": "abc", "lora_id": "alice/a", "status": "ok",
        "items": [{"prompt": "p", "response": "r", "feedback": "f", "trained_on": {"prompt_tokens": 9}}],
        "trained_on": {"response_tokens": 42}, "distill_result": {"metrics": {"loss": 1.5}, "teacher": "self"},
    }))
    (day / "110000000000-broken.json").write_text("{")
    with make_client() as client:
        html = client.get("/v1/dashboard").text

    assert _records(html) == ["alice/a", ""]
    assert "Other fields" in html and "response_tokens" in html and "42" in html
    assert "prompt_tokens" in html and "teacher" in html and "self" in html
    assert "Server orchestration" in html and "not recorded" in html
    assert "unreadable" in html


def test_record_text_is_escaped(data, make_client, write_record: Writer) -> None:
    write_record(data.log_dir, "alice/a", feedback="<script>alert(1)</script>", response="<b>bold</b>")
    with make_client() as client:
        html = client.get("/v1/dashboard").text

    assert "<script>alert(1)</script>" not in html and "<b>bold</b>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html


def test_pages_link_to_each_other(data, make_client, write_record: Writer) -> None:
    for i in range(25):
        write_record(data.log_dir, "alice/a" if i % 2 else "bob/b", feedback=f"note {i}")
    with make_client() as client:
        first = client.get("/v1/dashboard", params={"per_page": 10}).text
        second = client.get("/v1/dashboard", params={"page": 2, "per_page": 10}).text
        third = client.get("/v1/dashboard", params={"page": 3, "per_page": 10}).text
        beyond = client.get("/v1/dashboard", params={"page": 9, "per_page": 10}).text

    assert [len(_records(page)) for page in (first, second, third, beyond)] == [10, 10, 5, 0]
    assert "note 24" in first and "note 14" in second and "note 0" in third
    assert 'href="?page=2&amp;per_page=10" rel="next"' in first and 'rel="prev"' not in first
    assert 'href="?page=1&amp;per_page=10" rel="prev"' in second and 'href="?page=3&amp;per_page=10"' in second
    assert 'rel="next"' not in third
    assert "No records on page 9" in beyond


def test_adapter_filter(data, make_client, write_record: Writer) -> None:
    for i in range(6):
        write_record(data.log_dir, "alice/a" if i % 3 == 0 else "bob/b", feedback=f"note {i}")
    with make_client() as client:
        alice = client.get("/v1/dashboard", params={"lora_id": "alice/a"}).text
        everyone = client.get("/v1/dashboard", params={"lora_id": ""}).text

    assert _records(alice) == ["alice/a", "alice/a"]
    assert 'value="alice/a"' in alice and "show all" in alice
    assert len(_records(everyone)) == 6
    assert 'href="?per_page=20&amp;lora_id=bob%2Fb"' in everyone  # each adapter name links to its filter


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"page": 0}, "page"),
        ({"page": -1}, "page"),
        ({"page": 100_001}, "page"),
        ({"page": "two"}, "page"),
        ({"per_page": 0}, "per_page"),
        ({"per_page": 201}, "per_page"),
        ({"lora_id": "../../etc/passwd"}, "lora_id"),
        ({"lora_id": "/etc/passwd"}, "lora_id"),
        ({"lora_id": "a\x00b"}, "lora_id"),
        ({"lora_id": "x" * 300}, "lora_id"),
    ],
)
def test_bad_parameters_are_422_naming_the_field(make_client, params: dict[str, Any], field: str) -> None:
    with make_client() as client:
        response = client.get("/v1/dashboard", params=params)

    assert response.status_code == 422
    error = response.json()["error"]
    assert (error["param"], error["code"], error["type"]) == (field, 422, "invalid_request_error")
    assert field in error["message"]


def test_api_keys_scope_what_each_caller_sees(data, make_client, write_record: Writer, write_run: RunWriter) -> None:
    for i in range(4):
        write_record(data.log_dir, "alice/a" if i % 2 else "bob/b", feedback=f"note {i}")
    write_run(data.eval_dir, "run1")
    with make_client(api_keys=KEYS) as client:
        anonymous = client.get("/v1/dashboard")
        wrong = client.get("/v1/dashboard", headers=_bearer("nope"))
        alice = client.get("/v1/dashboard", headers=_bearer(ALICE))
        alice_on_bob = client.get("/v1/dashboard", params={"lora_id": "bob/b"}, headers=_bearer(ALICE))
        alice_eval = client.get("/v1/eval", headers=_bearer(ALICE))
        admin = client.get("/v1/dashboard", headers=_bearer(ADMIN))
        admin_eval = client.get("/v1/eval/run1", headers=_bearer(ADMIN))
        eval_urls = ("/v1/eval", "/v1/eval/run1", "/v1/eval/run1/plots/capability.png")
        anonymous_eval = [client.get(url) for url in eval_urls]

    for response in (anonymous, wrong, *anonymous_eval):
        assert response.status_code == 401
        assert response.json()["error"]["type"] == "authentication_error"
        assert response.headers["www-authenticate"] == "Bearer"
    assert alice.status_code == 200 and _records(alice.text) == ["alice/a", "alice/a"]
    assert "note 0" not in alice.text and "note 2" not in alice.text
    assert alice_on_bob.status_code == 403 and alice_on_bob.json()["error"]["param"] == "lora_id"
    assert alice_eval.status_code == 403 and alice_eval.json()["error"]["type"] == "permission_error"
    assert admin.status_code == 200 and sorted(_records(admin.text)) == ["alice/a"] * 2 + ["bob/b"] * 2
    assert admin_eval.status_code == 200


def test_eval_list_shows_done_and_running_runs(data, make_client, write_run: RunWriter) -> None:
    write_run(data.eval_dir, "run1")
    write_run(data.eval_dir, "live", complete=False, steps=2, plots=())
    with make_client() as client:
        response = client.get("/v1/eval")

    html = response.text
    assert response.status_code == 200
    assert html.index('href="eval/live"') < html.index('href="eval/run1"')  # in progress = newest folder
    assert '<span class="badge progress">in progress</span>' in html
    assert '<span class="badge ok">complete</span>' in html
    assert "<div>no_emoji: 2 / 5</div>" not in html and "<div>no_emoji: 2</div>" in html  # steps.jsonl lines so far
    assert "no_emoji: 5 / 5" in html
    assert "2026-05-01 10:00:00 UTC" in html and "smollm2-135m" in html
    assert "no_emoji · identity_compliance: 0.25 → 0.75" in html
    assert "no_emoji · identity_compliance: 0.25 → 0.2" in html  # the running run's latest value (step 2)


def test_eval_run_in_progress_shows_latest_values(data, make_client, write_run: RunWriter) -> None:
    write_run(data.eval_dir, "live", complete=False, steps=3, plots=())
    with make_client() as client:
        html = client.get("/v1/eval/live").text

    assert '<span class="badge progress">in progress</span>' in html
    assert '<th class="num">latest</th>' in html and "steps completed 3" in html
    no_emoji = html.split("<h2>no_emoji</h2>")[1]
    row = re.search(r"<td>identity_compliance</td>(.*?)</tr>", no_emoji, re.S)
    assert row is not None
    assert re.findall(r'<td class="num[^"]*">([^<]*)</td>', row.group(1)) == ["0.25", "0.3", "+0.05"]
    assert "No plots yet." in html


@pytest.mark.parametrize(("status", "badge"), [("failed", "error"), ("interrupted", "progress")])
def test_eval_run_status_from_the_summary(data, make_client, write_run: RunWriter, status: str, badge: str) -> None:
    summary_path = write_run(data.eval_dir, "run1", plots=()) / "summary.json"
    summary_path.write_text(summary_path.read_text().replace('"complete"', f'"{status}"'))
    with make_client() as client:
        html = client.get("/v1/eval/run1").text
    assert f'<span class="badge {badge}">{status}</span>' in html


def test_eval_run_page_has_the_summary_tables_and_plots(data, make_client, write_run: RunWriter) -> None:
    run = write_run(data.eval_dir, "run1")
    with make_client() as client:
        page = client.get("/v1/eval/run1")
        plot = client.get("/v1/eval/run1/plots/capability.png")
        empty = client.get("/v1/eval")

    html = page.text
    assert page.status_code == 200
    assert html.count('<table class="summary">') == 2
    row = re.search(r"<td>identity_compliance</td>(.*?)</tr>", html, re.S)
    assert row is not None
    assert re.findall(r'<td class="num[^"]*">([^<]*)</td>', row.group(1)) == ["0.25", "0.75", "+0.5"]
    assert "<td>new_metric</td>" in html and "unchanged" in html and "git_commit" in html and "seed" in html
    assert '<img src="run1/plots/capability.png" alt="capability.png">' in html
    assert "<figcaption>identity_compliance.png</figcaption>" in html
    assert 'href="../eval"' in html and 'href="../dashboard"' in html
    assert plot.status_code == 200 and plot.headers["content-type"] == "image/png"
    assert plot.content == (run / "plots" / "capability.png").read_bytes()
    assert plot.content.startswith(b"\x89PNG\r\n\x1a\n")
    assert empty.status_code == 200


def test_no_eval_runs_yet(make_client) -> None:
    with make_client() as client:
        response = client.get("/v1/eval")
    assert response.status_code == 200 and "No eval runs in" in response.text


TRAVERSALS = [
    "/v1/eval/..",
    "/v1/eval/%2e%2e",
    "/v1/eval/.hidden",
    "/v1/eval/%00",
    "/v1/eval/..%2F..%2Fetc",
    "/v1/eval/%2e%2e/plots/secret.png",
    "/v1/eval/..%2Fsecret/plots/x.png",
    "/v1/eval/run1/plots/..%2Fsummary.json",
    "/v1/eval/run1/plots/%2e%2e%2fsummary.json",
    "/v1/eval/run1/plots/%2Fetc%2Fpasswd",
    "/v1/eval/run1/plots/x%00.png",
    "/v1/eval/run1/plots/summary.json",
    "/v1/eval/run1/plots/%2e%2e%2f%2e%2e%2fsecret.png",
    "/v1/eval/run1/plots/link.png",
    "/v1/eval/run1/plots/missing.png",
    "/v1/eval/missing",
    "/v1/dashboard?lora_id=..%2F..%2Fsecret",
    "/v1/dashboard?lora_id=%2Fetc%2Fpasswd",
]
RAW_TRAVERSALS = [  # request lines no HTTP client would send: dot segments left in
    "/v1/eval/../../secret.png",
    "/v1/eval/../plots/secret.png",
    "/v1/eval/run1/plots/../../../secret.png",
    "/v1/eval/run1/plots/../summary.json",
    "/v1/eval/./run1/plots/..%2f..%2f..%2fsecret.png",
]


@pytest.fixture
def traversal_target(data, write_run: RunWriter) -> bytes:
    """An eval run, and a secret next to the eval folder that a symlink in the run's plots points at."""
    run = write_run(data.eval_dir, "run1")
    secret = b"\x89PNG-secret-bytes"
    (data.root / "secret.png").write_bytes(secret)
    (run / "plots" / "link.png").symlink_to(data.root / "secret.png")
    return secret


@pytest.mark.parametrize("path", TRAVERSALS)
def test_no_path_leaves_the_data_folders(make_client, traversal_target: bytes, path: str) -> None:
    with make_client() as client:
        response = client.get(path)

    assert response.status_code in (404, 422), response.text
    assert response.json()["error"]["code"] == response.status_code
    assert traversal_target not in response.content


def test_raw_dot_segments_do_not_leave_the_data_folders(data, idle_engine, threaded_uvicorn,
                                                        traversal_target: bytes) -> None:
    app = build_app(data.settings(), engine=idle_engine)
    with threaded_uvicorn(app) as server:
        for path in RAW_TRAVERSALS:
            connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
            connection.request("GET", path)  # http.client sends the path as given
            response = connection.getresponse()
            body = response.read()
            connection.close()
            assert response.status in (404, 422), (path, response.status, body)
            assert b'"error"' in body and traversal_target not in body, path
