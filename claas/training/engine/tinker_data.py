"""Token sequences and Tinker `Datum`s for one SDPO step (no network: the engine does the calls).

Alignment (Tinker's convention, the same as next-token prediction everywhere): the datum's input is the full
sequence minus its last token, row j of `target_tokens` is scored for token j + 1, so the T response tokens are the
last T rows. `sample(..., topk_prompt_logprobs=K)` and `compute_logprobs` report per *sequence position*
(position 0 has no context and is None), so response token t sits at position P + t of the teacher sequence.
"""

from __future__ import annotations

from typing import Any

from claas.training.examples import ExampleTokens


def teacher_topk(topk_prompt_logprobs: Any, prompt_len: int, response_len: int, k: int) -> tuple[list, list]:
    """(ids [T][K'], logprobs [T][K']) of the teacher at the response positions, K' = min(k, the fewest returned)."""
    rows = []
    for t in range(response_len):
        entry = topk_prompt_logprobs[prompt_len + t] if topk_prompt_logprobs is not None else None
        if not entry:
            raise ValueError(f"the teacher returned no top-k logprobs at response position {t}")
        rows.append(sorted(entry, key=lambda pair: -pair[1]))
    width = min(k, *(len(row) for row in rows))
    return [[int(i) for i, _ in row[:width]] for row in rows], [[float(lp) for _, lp in row[:width]] for row in rows]


def response_values(per_position: list[float | None], prompt_len: int, response_len: int) -> list[float]:
    """Values of `compute_logprobs` (one per sequence position, the first None) at the response tokens."""
    values = per_position[prompt_len : prompt_len + response_len]
    if len(values) != response_len or any(v is None for v in values):
        raise ValueError("compute_logprobs returned no value for some response token")
    return [float(v) for v in values if v is not None]


def sdpo_datum(tokens: ExampleTokens, teacher_ids: list[list[int]], teacher_lps: list[list[float]],
               base_logprobs: list[float] | None = None) -> Any:
    """One Datum: target_tokens [N, K+1] (column 0 = the real next token), the teacher's logprobs [N, K], the mask
    and the rollout/base logprobs [N]. Only target_tokens and weights reach Tinker; the rest stays client-side for
    the loss function."""
    import numpy as np
    from tinker import types

    sequence = tokens.prompt_ids + tokens.response_ids
    n = len(sequence) - 1
    t_len = len(tokens.response_ids)
    width = len(teacher_ids[0])
    start = n - t_len  # first row that predicts a response token
    targets = np.zeros((n, width + 1), dtype=np.int64)
    targets[:, 0] = sequence[1:]
    targets[start:, 1:] = np.asarray(teacher_ids, dtype=np.int64)
    teacher = np.zeros((n, width), dtype=np.float32)
    teacher[start:] = np.asarray(teacher_lps, dtype=np.float32)
    mask = np.zeros(n, dtype=np.float32)
    mask[start:] = 1.0
    inputs: dict[str, Any] = {
        "target_tokens": types.TensorData.from_numpy(targets),
        "teacher_logprobs": types.TensorData.from_numpy(teacher),
        "mask": types.TensorData.from_numpy(mask),
    }
    for key, values in (("rollout_logprobs", tokens.rollout_logprobs), ("base_logprobs", base_logprobs)):
        if values is not None:
            column = np.zeros(n, dtype=np.float32)
            column[start:] = np.asarray(values, dtype=np.float32)
            inputs[key] = types.TensorData.from_numpy(column)
    return types.Datum(model_input=types.ModelInput.from_ints(sequence[:-1]), loss_fn_inputs=inputs)
