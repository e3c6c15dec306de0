"""Feedback records on disk (written by the API's own writer): order, paging, adapter filter, scope filter, and
lenient parsing of records with missing, extra or broken fields."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from claas.auth import AuthScope
from claas.dashboard.records import load_record, read_page, record_paths
from claas.errors import PhaseFailedError

Writer = Callable[..., dict[str, Any]]


def _write_many(write_record: Writer, log_dir: Path, count: int) -> list[dict[str, Any]]:
    """`count` records alternating alice/bob, oldest first."""
    adapters = ("alice/a", "bob/b")
    return [write_record(log_dir, adapters[i % 2], feedback=f"feedback {i}") for i in range(count)]


def test_pages_are_newest_first_and_cover_every_record_once(tmp_path: Path, write_record: Writer) -> None:
    written = _write_many(write_record, tmp_path, 7)
    newest_first = [r["request_id"] for r in reversed(written)]

    pages = [read_page(tmp_path, page=n, per_page=3) for n in (1, 2, 3, 4)]

    assert [[r.request_id for r in p.records] for p in pages] == [
        newest_first[0:3], newest_first[3:6], newest_first[6:7], []
    ]
    assert [p.has_next for p in pages] == [True, True, False, False]
    assert {p.total for p in pages} == {7}
    assert pages[1].first_index == 4


def test_adapter_filter_pages_only_that_adapters_records(tmp_path: Path, write_record: Writer) -> None:
    written = _write_many(write_record, tmp_path, 9)
    alice_newest_first = [r["request_id"] for r in reversed(written) if r["lora_id"] == "alice/a"]  # 5 of them

    first = read_page(tmp_path, page=1, per_page=2, lora_id="alice/a")
    last = read_page(tmp_path, page=3, per_page=2, lora_id="alice/a")

    assert [r.request_id for r in first.records] == alice_newest_first[0:2]
    assert first.has_next and first.total is None  # stopped reading one match past the page
    assert [r.request_id for r in last.records] == alice_newest_first[4:5]
    assert not last.has_next and last.total == 5
    assert read_page(tmp_path, page=1, per_page=10, lora_id="nobody/x").records == []


def test_scope_filter_hides_other_prefixes(tmp_path: Path, write_record: Writer) -> None:
    _write_many(write_record, tmp_path, 6)
    scope = AuthScope(prefix="bob/", authenticated=True)

    page = read_page(tmp_path, page=1, per_page=50, allows=scope.allows)

    assert [r.lora_id for r in page.records] == ["bob/b"] * 3
    assert page.total == 3


def test_record_fields_are_read_from_the_real_shape(tmp_path: Path, write_record: Writer) -> None:
    prompt = [{"role": "system", "content": "Be brief."},
              {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]}]
    written = write_record(tmp_path, "alice/a", feedback="Too long.", prompt=prompt, response="Hello!", source="cache")

    record = load_record(written["path"])

    assert record.request_id == written["request_id"] and record.lora_id == "alice/a" and record.status == "ok"
    assert record.timestamp == written["timestamp"]
    [item] = record.items
    assert item.messages == [("system", "Be brief."), ("user", "Hi\nthere")]
    assert (item.response, item.feedback, item.source) == ("Hello!", "Too long.", "cache")
    assert not {"prompt", "response", "feedback", "source"} & set(item.extra)  # fields added later land in extra
    assert record.metrics["loss"] == pytest.approx(0.4321)
    assert record.distill == {"lora_id": "alice/a", "step": 3}
    assert record.distill_timing_ms["compute"] == 300.0
    assert record.timing_ms["total"] == 420.0
    assert record.vllm == {"slept": True, "woke": True}
    assert record.error is None and record.unreadable is None
    assert record.key == f"{written['path'].parent.name}/{written['path'].stem}"


def test_failed_record_keeps_its_error(tmp_path: Path, write_record: Writer) -> None:
    written = write_record(tmp_path, "alice/a", feedback="x", failure=PhaseFailedError("distill", "out of memory"))

    record = load_record(written["path"])

    assert record.status == "error"
    assert record.error is not None and record.error["phase"] == "distill"
    assert "out of memory" in record.error["message"]
    assert record.metrics == {} and record.distill == {}


def test_unknown_fields_are_kept_and_missing_ones_tolerated(tmp_path: Path) -> None:
    day = tmp_path / "2026-01-02"
    day.mkdir()
    extra = day / "120000000000-extra.json"
    extra.write_text(json.dumps({
        "lora_id": "alice/a",
        "items": [{"prompt": "p", "response": "r", "feedback": "f", "trained_on": {"prompt_tokens": 9}}, "junk"],
        "trained_on": {"tokens": 12},
        "distill_result": {"metrics": {"loss": 1.0}, "teacher": "self"},
        "timing_ms": "not a mapping",
    }))
    (day / "110000000000-list.json").write_text("[1, 2]")
    (day / "100000000000-broken.json").write_text("{not json")

    first, second, third = (load_record(path) for path in record_paths(tmp_path))

    assert first.extra == {"trained_on": {"tokens": 12}}
    assert first.items[0].extra == {"trained_on": {"prompt_tokens": 9}} and len(first.items) == 1
    assert first.distill == {"teacher": "self"} and first.timing_ms == {} and first.vllm == {}
    assert first.status is None and first.request_id is None
    assert second.unreadable is not None and "list" in second.unreadable
    assert third.unreadable is not None and third.lora_id is None


def test_unreadable_records_are_shown_unfiltered_only(tmp_path: Path) -> None:
    day = tmp_path / "2026-01-02"
    day.mkdir()
    (day / "100000000000-broken.json").write_text("{not json")

    assert len(read_page(tmp_path, page=1, per_page=5).records) == 1
    assert read_page(tmp_path, page=1, per_page=5, allows=lambda lora_id: True).records == []


def test_listing_orders_days_and_skips_what_is_not_a_record(tmp_path: Path, write_record: Writer) -> None:
    today = write_record(tmp_path, "alice/a", feedback="today")["path"]
    old_day = tmp_path / "2020-01-01"
    old_day.mkdir()
    old = old_day / "235959999999-old.json"
    old.write_text(today.read_text())
    (old_day / "000000000000-partial.tmp").write_text("{")  # a write in progress
    (old_day / ".hidden.json").write_text("{}")
    (tmp_path / "not-a-day").mkdir()
    (tmp_path / "not-a-day" / "x.json").write_text("{}")
    (tmp_path / "2020-01-02.json").write_text("{}")

    assert record_paths(tmp_path) == [today, old]
    assert record_paths(tmp_path / "missing") == []


def test_page_numbers_start_at_one(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        read_page(tmp_path, page=0, per_page=10)
