"""The dashboards in a real headless browser: Debian's `chromium` driven by Playwright (no browser download), against
the real API served by uvicorn on a free 127.0.0.1 port, with API keys on.

Data: 30 feedback records for two adapters (two pages at the default 20 per page), one with a long unbroken line, one
failed; one finished eval run with two matplotlib PNG plots. Screenshots go to the test's tmp dir and, when
CLAAS_TEST_ARTIFACTS is set, to `test-artifacts/dashboard/` (or the folder the variable names).

Skipped, with the reason, only when Playwright or a chromium binary is missing.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from claas.api import build_app
from claas.errors import PhaseFailedError
from claas.training.engine.base import TrainingEngine

if TYPE_CHECKING:
    from playwright.sync_api import Browser, BrowserContext, Page

pytestmark = pytest.mark.slow

ADMIN, ALICE = "admin-key-0123", "alice-key-4567"
ALICE_LORA, BOB_LORA = "alice/assistant", "bob/helper"
RECORDS = 30
REPO = Path(__file__).resolve().parents[2]
#: Finds the text elements of a page and returns the smallest computed font size among them (px).
MIN_FONT_JS = """() => {
  let min = Infinity;
  for (const el of document.querySelectorAll('body *')) {
    const text = [...el.childNodes].some(n => n.nodeType === Node.TEXT_NODE && n.textContent.trim());
    if (!text || el.getClientRects().length === 0) continue;
    min = Math.min(min, parseFloat(getComputedStyle(el).fontSize));
  }
  return min;
}"""
OVERFLOW_JS = "() => [document.documentElement.scrollWidth, window.innerWidth]"


def _feedback_text(i: int) -> str:
    return f"Feedback number {i}: shorter answers, please."


@dataclass
class Site:
    base_url: str
    artifacts: list[Path]

    def url(self, path: str) -> str:
        return f"{self.base_url}{path}"

    def screenshot(self, page: Page, name: str) -> None:
        for folder in self.artifacts:
            folder.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(folder / f"{name}.png"), full_page=True)


def _artifact_dirs(tmp: Path) -> list[Path]:
    dirs = [tmp / "screenshots"]
    chosen = os.environ.get("CLAAS_TEST_ARTIFACTS", "").strip()
    if chosen:
        base = REPO / "test-artifacts" if chosen.lower() in ("1", "true", "yes") else Path(chosen)
        dirs.append(base / "dashboard")
    return dirs


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="playwright is not installed (pip install playwright; it is in the dev extra)"
    )
    executable = _chromium()
    if executable is None:
        pytest.skip("no chromium binary on PATH (apt-get install -y chromium); Playwright's own download is not used")
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=executable)
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture(scope="module")
def site(
    tmp_path_factory: pytest.TempPathFactory,
    idle_engine: TrainingEngine,
    threaded_uvicorn: Any,
    write_record: Callable[..., dict[str, Any]],
    write_run: Callable[..., Path],
) -> Iterator[Site]:
    from claas.core.config import Settings

    root = tmp_path_factory.mktemp("dashboard-browser")
    log_dir, eval_dir = root / "feedback", root / "evals"
    for i in range(RECORDS):
        lora = ALICE_LORA if i % 2 else BOB_LORA
        response = "word " * 40 + "x" * 300 if i == 3 else f"Answer {i}."  # a line longer than any phone
        failure = PhaseFailedError("distill", "non-finite gradient norm") if i == 5 else None
        write_record(log_dir, lora, feedback=_feedback_text(i), response=response, failure=failure)
    write_run(eval_dir, "run1")
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        vllm_base_url="http://127.0.0.1:9",
        lora_root=root / "loras",
        model_cache=root / "models",
        feedback_log_dir=log_dir,
        eval_dir=eval_dir,
        api_keys=f"{ADMIN},{ALICE}:alice/",
    )
    with threaded_uvicorn(build_app(settings, engine=idle_engine)) as server:
        yield Site(server.base_url, _artifact_dirs(root))


def _context(browser: Browser, key: str | None, **options: Any) -> BrowserContext:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return browser.new_context(extra_http_headers=headers, **options)


def _lora_ids(page: Page) -> list[str]:
    return page.locator("details.record").evaluate_all("els => els.map(e => e.dataset.loraId)")


def test_pages_without_a_key_are_401(browser: Browser, site: Site) -> None:
    context = _context(browser, None)
    page = context.new_page()
    for path in ("/v1/dashboard", "/v1/eval", "/v1/eval/run1", "/v1/eval/run1/plots/capability.png"):
        response = page.goto(site.url(path))
        assert response is not None and response.status == 401, path
        assert "missing API key" in page.content()
    context.close()


def test_dashboard_pages_filters_and_expands(browser: Browser, site: Site) -> None:
    context = _context(browser, ADMIN)
    page = context.new_page()
    response = page.goto(site.url("/v1/dashboard"))
    assert response is not None and response.status == 200

    records = page.locator("details.record")
    assert records.count() == 20
    assert "Records 1–20 of 30" in page.locator("#range").inner_text()
    first_key = records.first.get_attribute("id")
    site.screenshot(page, "dashboard-page1")

    page.click("a[rel=next]")
    page.wait_for_url("**page=2**")
    assert records.count() == RECORDS - 20
    assert "Records 21–30 of 30" in page.locator("#range").inner_text()
    assert page.locator("a[rel=next]").count() == 0

    page.click("a[rel=prev]")
    page.wait_for_url("**page=1**")
    assert records.count() == 20 and records.first.get_attribute("id") == first_key

    page.fill("#lora_id", BOB_LORA)
    page.click("form.filter button[type=submit]")
    page.wait_for_url("**lora_id=bob%2Fhelper**")
    assert _lora_ids(page) == [BOB_LORA] * (RECORDS // 2)
    page.click("text=show all")
    page.wait_for_load_state()
    assert len(_lora_ids(page)) == 20

    page.locator("details.record a.adapter", has_text=ALICE_LORA).first.click()  # adapter names link to the filter
    page.wait_for_url("**lora_id=alice%2Fassistant**")
    assert _lora_ids(page) == [ALICE_LORA] * (RECORDS // 2)

    newest = page.locator("details.record").first
    feedback = newest.locator("pre.feedback")
    assert newest.get_attribute("open") is None and not feedback.is_visible()
    newest.locator("summary").click()
    assert newest.get_attribute("open") is not None
    assert feedback.is_visible() and feedback.inner_text() == _feedback_text(RECORDS - 1)
    assert newest.locator("table.metrics").is_visible() and "loss" in newest.inner_text()
    site.screenshot(page, "dashboard-expanded")
    context.close()


def test_eval_summary_table_and_plots(browser: Browser, site: Site) -> None:
    context = _context(browser, ADMIN)
    page = context.new_page()
    page.goto(site.url("/v1/eval"))
    assert "run1" in page.locator("table.runs").inner_text()
    page.click("table.runs a:text('run1')")
    page.wait_for_url("**/v1/eval/run1")

    tables = page.locator("table.summary")
    assert tables.count() == 2
    rows = tables.first.locator("tbody tr").evaluate_all(
        "rows => rows.map(r => [...r.cells].map(c => c.innerText.trim()))"
    )
    assert rows[0] == ["identity_compliance", "0.25", "0.75", "+0.5"]
    assert ["new_metric", "—", "3", "—"] in rows

    images = page.locator("figure img")
    assert images.count() == 2
    images.last.scroll_into_view_if_needed()
    page.wait_for_function("() => [...document.images].every(i => i.complete)")
    loaded = page.evaluate("() => [...document.images].map(i => [i.alt, i.naturalWidth])")
    assert sorted(loaded) == sorted([["capability.png", 200], ["identity_compliance.png", 200]])  # 4 in * 50 dpi
    assert page.locator("figcaption").all_inner_texts() == ["capability.png", "identity_compliance.png"]
    site.screenshot(page, "eval-run")
    context.close()


def test_scoped_key_sees_only_its_records(browser: Browser, site: Site) -> None:
    context = _context(browser, ALICE)
    page = context.new_page()
    page.goto(site.url("/v1/dashboard"))
    assert _lora_ids(page) == [ALICE_LORA] * (RECORDS // 2)
    assert _feedback_text(0) not in page.content()  # record 0 is bob's
    assert "key for alice/*" in page.locator("header").inner_text()
    response = page.goto(site.url(f"/v1/dashboard?lora_id={BOB_LORA}"))
    assert response is not None and response.status == 403
    response = page.goto(site.url("/v1/eval"))
    assert response is not None and response.status == 403
    context.close()


@pytest.mark.parametrize("path", ["/v1/dashboard", "/v1/eval", "/v1/eval/run1"])
def test_readable_at_phone_width(browser: Browser, site: Site, path: str) -> None:
    context = _context(browser, ADMIN, viewport={"width": 390, "height": 844})
    page = context.new_page()
    page.goto(site.url(path))
    page.evaluate("() => document.querySelectorAll('details').forEach(d => d.open = true)")
    page.wait_for_function("() => [...document.images].every(i => i.complete)")

    scroll_width, inner_width = page.evaluate(OVERFLOW_JS)
    assert scroll_width <= inner_width + 1, f"{path}: page is {scroll_width}px wide in a {inner_width}px viewport"
    assert page.evaluate(MIN_FONT_JS) >= 12
    site.screenshot(page, "phone" + path.replace("/", "-"))
    context.close()
