"""SSE framing/parsing, think-block stripping (whole text and streamed), cache-key normalization."""

from __future__ import annotations

import json

import pytest

from claas.inference.helpers import SseParser, ThinkStripper, normalize_text, sse_event, strip_think, text_key


def test_sse_event_roundtrips_through_the_parser():
    chunk = {"id": "chatcmpl-1", "choices": [{"index": 0, "delta": {"content": "héllo\n"}}]}
    parser = SseParser()
    assert [json.loads(data) for data in parser.feed(sse_event(chunk))] == [chunk]


def test_parser_handles_arbitrary_byte_splits_crlf_comments_and_multiline_data():
    stream = b': keep-alive\r\n\r\ndata: {"a": 1}\r\n\r\nevent: x\ndata: line1\ndata: line2\n\ndata: [DONE]\n\n'
    for split in range(1, len(stream)):
        parser = SseParser()
        events = parser.feed(stream[:split]) + parser.feed(stream[split:])
        assert events == ['{"a": 1}', "line1\nline2", "[DONE]"], split


def test_parser_splits_multibyte_utf8_safely_and_flushes_an_unterminated_event():
    payload = sse_event({"t": "日本"}) + b"data: tail"
    parser = SseParser()
    events = []
    for byte in payload:
        events += parser.feed(bytes([byte]))
    assert [json.loads(e) for e in events] == [{"t": "日本"}]
    assert parser.flush() == ["tail"]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("no think here", "no think here"),
        ("<think>\nhmm\n</think>\n\nAnswer.", "Answer."),
        ("Before <think>x</think> after", "Before  after"),
        ("reasoning that began in the prompt</think>\nAnswer", "Answer"),
        ("<think>unterminated reasoning", ""),
        ("a<think>1</think>b<think>2</think>c", "abc"),
    ],
)
def test_strip_think(text, expected):
    assert strip_think(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "<think>\nplan</think>\n\nThe answer is <b>bold</b> and 1 < 2.",
        "plain answer with a < sign and <thin> lookalike",
        "x<think>a</think>y<think>b</think>z",
        "ends with a partial tag <thi",
        "Before <think>x</think> after",
        "\n<think>a</think>\n\nAnswer",
        "  leading space kept without a block",
        "<think>only reasoning</think>",
    ],
)
def test_think_stripper_matches_strip_think_for_every_split(text):
    expected = strip_think(text)
    for size in (1, 2, 3, 5, 8):
        stripper = ThinkStripper()
        pieces = [stripper.feed(text[i : i + size]) for i in range(0, len(text), size)]
        assert "".join(pieces) + stripper.flush() == expected, size


def test_think_stripper_emits_text_as_soon_as_it_cannot_be_a_tag():
    stripper = ThinkStripper()
    assert stripper.feed("Hello") == "Hello"
    assert stripper.feed(" <") == " "  # held back: may start <think>
    assert stripper.feed("b>") == "<b>"


def test_normalize_and_key():
    assert normalize_text("  <think>x</think>\n The   answer\t is\n") == "The answer is"
    assert text_key("The answer is") == text_key("<think>y</think>The\nanswer  is ")
    assert text_key("The answer is") != text_key("The answer was")
