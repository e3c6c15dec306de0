"""The token sequences of one training example, shared by every engine: the student's prompt and response ids
(exact served tokens when the completion came from the cache, else the chat template + text + EOS), the teacher's
prompt ids (the feedback shown as `placement` says) and the rollout logprobs that weight each response token."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from claas.core.types import FeedbackPlacement, TrainingExample
from claas.training.teacher import chat_prompt_ids, teacher_messages


@dataclass
class ExampleTokens:
    prompt_ids: list[int]
    response_ids: list[int]
    teacher_prompt_ids: list[int]
    rollout_logprobs: list[float] | None


def example_tokens(tokenizer: Any, example: TrainingExample, placement: FeedbackPlacement = "user") -> ExampleTokens:
    if example.prompt_token_ids is not None and example.response_token_ids is not None:
        prompt_ids, response_ids = list(example.prompt_token_ids), list(example.response_token_ids)
    else:
        prompt_ids = chat_prompt_ids(tokenizer, example.messages)
        response_ids = list(tokenizer(example.response_text, add_special_tokens=False)["input_ids"])
        eos = tokenizer.eos_token_id
        if eos is not None and (not response_ids or response_ids[-1] != eos):
            response_ids.append(eos)  # the turn ends here: teach where to stop, too
    if not response_ids:
        raise ValueError("the response has no tokens to train on")
    rollout = example.rollout_logprobs
    if rollout is not None and len(rollout) != len(response_ids):
        raise ValueError(f"rollout_logprobs has {len(rollout)} values but the response has {len(response_ids)} tokens")
    teacher_ids = chat_prompt_ids(tokenizer, teacher_messages(example.messages, example.feedback, placement))
    return ExampleTokens(prompt_ids, response_ids, teacher_ids, rollout)


#: A demonstration whose distinct-token share is below this is a loop ("🌟🌟🌟...", one sentence over and over).
MIN_DISTINCT_TOKEN_SHARE = 0.35
#: Shorter answers are never judged: a short answer has few tokens to repeat.
MIN_JUDGED_TOKENS = 16


def is_degenerate(token_ids: list[int]) -> bool:
    """Is this answer a repetition loop? Small teachers shown an instruction sometimes fall into one (SmolLM2 told
    not to use emojis answers a tweet request with a single emoji forty times); imitating it teaches the loop."""
    if len(token_ids) < MIN_JUDGED_TOKENS:
        return False
    return len(set(token_ids)) / len(token_ids) < MIN_DISTINCT_TOKEN_SHARE
