"""CLaaS's own request models: the single and batch feedback forms."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from claas.core.types import FeedbackRequest, TrainingConfig

ITEM = {"lora_id": "u/a", "prompt": "p", "response": "r", "feedback": "f"}


def test_single_form_becomes_one_item() -> None:
    request = FeedbackRequest.model_validate({**ITEM, "training": {"alpha": 0.2}})
    (item,) = request.items()
    assert item.lora_id == "u/a" and item.training == TrainingConfig(alpha=0.2)
    assert request.orchestration.sleep_level == 1


def test_batch_form() -> None:
    request = FeedbackRequest.model_validate({"requests": [ITEM, {**ITEM, "response": "r2"}]})
    assert [i.response for i in request.items()] == ["r", "r2"]


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"lora_id": "u/a", "prompt": "p"}, "missing field"),
        ({**ITEM, "requests": [ITEM]}, "either the single form"),
        ({"requests": [ITEM, {**ITEM, "lora_id": "u/b"}]}, "one lora_id"),
        ({**ITEM, "prompt": "   "}, "prompt must not be empty"),
        ({**ITEM, "training": {"alpha": 1.5}}, "alpha"),
        ({**ITEM, "training": {"learning_rate": 1e-4, "lr": 3}}, "lr"),
        ({**ITEM, "orchestration": {"sleep_level": 3}}, "sleep_level"),
    ],
)
def test_invalid_bodies_name_the_problem(body: dict, needle: str) -> None:
    with pytest.raises(ValidationError, match=needle):
        FeedbackRequest.model_validate(body)
