"""The batch KV cache on its own (no model): in-place growth, left padding, positions, rows joining and leaving.

A stand-in forward writes each fed token's id as its key/value through the real `DynamicCache.update`, so what a row
holds can be read back exactly; the real model runs through it in test_batching.py.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch
from transformers import LlamaConfig

from claas.modelserver.kvbatch import _SPARE, PaddedKVBatch, new_cache

CONFIG = LlamaConfig(num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, hidden_size=8, vocab_size=50)
HEAD_DIM = 4


def _kv(ids: list[list[int]]) -> torch.Tensor:
    """Keys/values [B, 1, T, HEAD_DIM] whose every entry is the token id at that position."""
    return torch.tensor(ids, dtype=torch.float32)[:, None, :, None].expand(-1, 1, -1, HEAD_DIM).contiguous()


class RecordingForward:
    """Stands in for the model call: writes the fed ids into the cache and records mask and positions."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def __call__(self, *, input_ids, cache, use_cache, attention_mask, position_ids) -> SimpleNamespace:
        self.calls.append({"mask": attention_mask, "positions": position_ids.flatten().tolist()})
        for index in range(len(cache.layers)):
            cache.update(_kv(input_ids.tolist()), _kv(input_ids.tolist()), index)
        return SimpleNamespace(logits=torch.zeros(input_ids.shape[0], 1, CONFIG.vocab_size))


def _prefilled(ids: list[int]) -> Any:
    cache = new_cache(CONFIG)
    for index in range(CONFIG.num_hidden_layers):
        cache.update(_kv([ids]), _kv([ids]), index)
    return cache


def _rows(batch: PaddedKVBatch) -> list[list[int]]:
    keys = batch._cache.layers[0].keys  # [B, 1, L, D]
    return keys[:, 0, :, 0].long().tolist()


def test_growing_layers_hold_what_concatenation_would_and_survive_replacement():
    cache = new_cache(CONFIG)
    expected: list[int] = []
    for size in (3, 1, _SPARE - 2, 1, 1, 5):  # crosses the spare room twice
        ids = list(range(len(expected), len(expected) + size))
        cache.update(_kv([ids]), _kv([ids]), 0)
        expected += ids
        assert cache.layers[0].keys[0, 0, :, 0].long().tolist() == expected
    assert cache.get_seq_length(0) == len(expected)
    layer = cache.layers[0]
    layer.keys, layer.values = layer.keys[:, :, 2:].clone(), layer.values[:, :, 2:].clone()  # replaced from outside
    cache.update(_kv([[7]]), _kv([[7]]), 0)
    assert layer.keys[0, 0, :, 0].long().tolist() == expected[2:] + [7]
    assert layer.values[0, 0, :, 0].long().tolist() == expected[2:] + [7]


def test_rows_of_different_lengths_are_right_aligned_with_their_own_positions():
    batch = PaddedKVBatch(CONFIG)
    batch.add(_prefilled([1, 2, 3]))
    forward = RecordingForward()
    batch.step(forward, [4])
    assert forward.calls[-1]["mask"] is None and forward.calls[-1]["positions"] == [3]  # alone: the plain forward
    batch.add(_prefilled([11, 12, 13, 14, 15, 16]), copies=2)  # longer: the resident row is padded on the left
    assert _rows(batch) == [[0, 0, 1, 2, 3, 4], [11, 12, 13, 14, 15, 16], [11, 12, 13, 14, 15, 16]]
    assert batch.tokens() == 4 + 6 + 6 and batch.width == 6
    batch.step(forward, [5, 17, 18])
    call = forward.calls[-1]
    assert call["positions"] == [4, 6, 6]
    assert call["mask"].tolist() == [[0, 0, 1, 1, 1, 1, 1], [1] * 7, [1] * 7]
    assert _rows(batch)[0] == [0, 0, 1, 2, 3, 4, 5]


def test_leaving_rows_drop_the_columns_only_they_used():
    batch = PaddedKVBatch(CONFIG)
    batch.add(_prefilled([1, 2]))
    batch.add(_prefilled([5, 6, 7, 8, 9]))
    batch.add(_prefilled([20, 21, 22]))
    assert _rows(batch) == [[0, 0, 0, 1, 2], [5, 6, 7, 8, 9], [0, 0, 20, 21, 22]]
    batch.keep([2, 0])  # the long row left (and the order may change)
    assert _rows(batch) == [[20, 21, 22], [0, 1, 2]] and batch.width == 3
    forward = RecordingForward()
    batch.step(forward, [23, 3])
    assert forward.calls[-1]["positions"] == [3, 2]
    assert _rows(batch) == [[20, 21, 22, 23], [0, 1, 2, 3]]
    batch.keep([0])
    batch.step(forward, [24])
    assert forward.calls[-1]["mask"] is None and _rows(batch) == [[20, 21, 22, 23, 24]]
    batch.keep([])
    assert len(batch) == 0 and batch.tokens() == 0
