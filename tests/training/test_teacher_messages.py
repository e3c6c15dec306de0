"""Where the teacher sees the feedback: the hindsight block (user turn) or the system prompt; inputs never change."""

from __future__ import annotations

import copy

import pytest

from claas.core.types import FeedbackPlacement, TrainingConfig
from claas.training.teacher import HINDSIGHT_OPENING, SYSTEM_INSTRUCTION, SYSTEM_PREAMBLE, teacher_messages

FEEDBACK = "Your name is Kuro."


def test_user_placement_appends_the_hindsight_block_to_the_last_user_turn() -> None:
    messages = [{"role": "user", "content": "first"}, {"role": "assistant", "content": "a"},
                {"role": "user", "content": "Who are you?"}]  # fmt: skip
    before = copy.deepcopy(messages)
    result = teacher_messages(messages, FEEDBACK)
    assert messages == before
    assert result[0] == messages[0] and result[1] == messages[1]
    assert result[2]["content"].startswith("Who are you?" + HINDSIGHT_OPENING + FEEDBACK)


def test_system_placement_adds_a_standing_instruction() -> None:
    messages = [{"role": "user", "content": "Who are you?"}]
    result = teacher_messages(messages, FEEDBACK, "system")
    assert result == [{"role": "system", "content": SYSTEM_PREAMBLE + SYSTEM_INSTRUCTION + FEEDBACK}, messages[0]]
    assert messages == [{"role": "user", "content": "Who are you?"}]


def test_system_placement_extends_an_existing_system_prompt() -> None:
    messages = [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
                {"role": "user", "content": "Who are you?"}]  # fmt: skip
    result = teacher_messages(messages, FEEDBACK, "system")
    assert result[0]["content"] == "Be brief.\n\n" + SYSTEM_INSTRUCTION + FEEDBACK
    assert result[1:] == messages[1:]
    assert messages[0]["content"] == [{"type": "text", "text": "Be brief."}]


@pytest.mark.parametrize("placement", ["user", "system"])
def test_a_conversation_without_a_user_turn_is_refused(placement: FeedbackPlacement) -> None:
    with pytest.raises(ValueError, match="no user message"):
        teacher_messages([{"role": "system", "content": "x"}], FEEDBACK, placement)


def test_demonstration_needs_the_local_teacher() -> None:
    assert TrainingConfig(teacher_demonstration=True).teacher_demonstration
    with pytest.raises(ValueError, match="teacher_demonstration needs teacher_mode 'self'"):
        TrainingConfig(teacher_demonstration=True, teacher_mode="remote")


def test_a_repetition_loop_is_degenerate_and_ordinary_answers_are_not() -> None:
    from claas.training.examples import is_degenerate

    assert is_degenerate([42] * 40)  # one emoji token forty times
    assert is_degenerate([1, 2, 3, 4, 5, 6, 7, 8] * 5)  # one sentence over and over
    assert not is_degenerate(list(range(40)))  # every token new
    assert not is_degenerate([7] * 10)  # too short to judge
    assert not is_degenerate([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 1, 2, 13, 14, 15, 16, 17, 18])
