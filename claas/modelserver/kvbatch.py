"""The KV cache of the sequences decoding together: one left-padded `DynamicCache` row per sequence.

Continuous batching needs sequences of different lengths in one forward pass. Each sequence is prefilled on its own
(its keys already carry their rotary positions), then its cache is copied into a row of the shared cache, right-aligned:
shorter rows are padded on the left and an attention mask hides the padding. A decode step then feeds one token per
row at once, with each row's own position (its count of real tokens). Rows leave by `keep` (finished, cancelled);
leading columns that only padding uses are cut off then, so a long sequence that left no longer costs attention.

When no row is padded (one sequence, or all the same length) the step passes no mask at all, so a lone sequence runs
exactly the plain single-sequence forward.

`new_cache` makes the caches used here: transformers' `DynamicCache`, whose full-attention layers append into spare
room (`_SPARE` positions, grown as needed) instead of concatenating. `DynamicLayer.update` copies the whole cache every
token; with 8 rows of 100 tokens that copy was 16 % of a decode step (measured), growing with the length.

Runs on the engine's worker thread only, under `torch.inference_mode()`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

_SPARE = 256  # positions of room added whenever a layer's keys/values outgrow their buffer


@functools.cache
def _growing_layer() -> type:
    """`DynamicLayer` that writes new keys/values into spare room of a buffer; `keys`/`values` stay views of the
    filled part, so every other cache method (length, masks, crop, batch select) works unchanged. When something
    replaced `keys` (e.g. `PaddedKVBatch` after rows joined or left) the next update starts a new buffer from it."""
    import torch
    from transformers.cache_utils import DynamicLayer

    class GrowingLayer(DynamicLayer):
        _key_buffer: "torch.Tensor | None" = None
        _value_buffer: "torch.Tensor | None" = None

        def update(self, key_states: "torch.Tensor", value_states: "torch.Tensor", *args: Any, **kwargs: Any) -> Any:
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            keys, values = self.keys, self.values
            assert keys is not None and values is not None  # set by lazy_initialization
            used = keys.shape[-2] if keys.numel() else 0
            end = used + key_states.shape[-2]
            buffer = self._key_buffer
            in_buffer = (
                buffer is not None
                and used > 0
                and keys.data_ptr() == buffer.data_ptr()
                and keys.shape[:2] == buffer.shape[:2]
                and keys.stride() == buffer.stride()
            )
            if not in_buffer or buffer is None or end > buffer.shape[-2]:
                self._key_buffer = self._grow(keys if used else None, key_states, end)
                self._value_buffer = self._grow(values if used else None, value_states, end)
            assert self._key_buffer is not None and self._value_buffer is not None
            self._key_buffer[:, :, used:end].copy_(key_states)
            self._value_buffer[:, :, used:end].copy_(value_states)
            self.keys, self.values = self._key_buffer[:, :, :end], self._value_buffer[:, :, :end]
            return self.keys, self.values

        @staticmethod
        def _grow(old: "torch.Tensor | None", new: "torch.Tensor", end: int) -> "torch.Tensor":
            batch, heads, _, dim = new.shape
            buffer = torch.empty(batch, heads, end + _SPARE, dim, dtype=new.dtype, device=new.device)
            if old is not None:
                buffer[:, :, : old.shape[-2]].copy_(old)
            return buffer

    return GrowingLayer


def new_cache(config: Any) -> Any:
    """A `DynamicCache` for `config` whose full-attention layers grow in place (sliding-window layers unchanged)."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    cache = DynamicCache(config=config)
    cache.layers = [_growing_layer()() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


class PaddedKVBatch:
    def __init__(self, config: Any) -> None:
        self._config = config
        self._cache: Any = None  # DynamicCache, one row per sequence: keys/values [B, H, L, D] per layer
        self._mask: "torch.Tensor | None" = None  # [B, L] long, 1 where a row holds a real token
        self._padded = False

    def __len__(self) -> int:
        return 0 if self._mask is None else int(self._mask.shape[0])

    @property
    def width(self) -> int:
        """Columns of the shared cache (the longest row, padding included)."""
        return 0 if self._mask is None else int(self._mask.shape[1])

    def tokens(self) -> int:
        """Real (unpadded) tokens held, all rows together."""
        return 0 if self._mask is None else int(self._mask.sum())

    def add(self, source: Any, copies: int = 1) -> None:
        """Append `copies` rows holding the single-sequence cache `source` (a prefilled `DynamicCache`)."""
        import torch
        from torch.nn.functional import pad

        rows = [(layer.keys, layer.values) for layer in source.layers]
        length = int(rows[0][0].shape[-2])
        if copies > 1:
            rows = [(k.expand(copies, -1, -1, -1), v.expand(copies, -1, -1, -1)) for k, v in rows]
        new_mask = torch.ones(copies, length, dtype=torch.long, device=rows[0][0].device)
        if self._mask is None:
            self._cache = new_cache(self._config)
            for index, (keys, values) in enumerate(rows):
                self._cache.update(keys, values, index)  # copies: the rows never alias the prefill's cache
            self._mask, self._padded = new_mask, False
            return
        width = max(self.width, length)
        layers = self._cache.layers
        if width > self.width:  # the newcomer is longer: pad every resident row on the left
            grow = width - self.width
            for layer in layers:
                layer.keys, layer.values = pad(layer.keys, (0, 0, grow, 0)), pad(layer.values, (0, 0, grow, 0))
            self._mask = pad(self._mask, (grow, 0))
        short = width - length
        for layer, (keys, values) in zip(layers, rows):
            if short:
                keys, values = pad(keys, (0, 0, short, 0)), pad(values, (0, 0, short, 0))
            layer.keys, layer.values = torch.cat([layer.keys, keys]), torch.cat([layer.values, values])
        self._mask = torch.cat([self._mask, pad(new_mask, (short, 0)) if short else new_mask])
        self._padded = bool((self._mask == 0).any())

    def keep(self, rows: list[int]) -> None:
        """Keep only `rows` (indices, in this order); drop the columns no kept row uses."""
        import torch

        if self._mask is None or rows == list(range(len(self))):
            return
        if not rows:
            self._cache, self._mask, self._padded = None, None, False
            return
        index = torch.tensor(rows, dtype=torch.long, device=self._mask.device)
        mask = self._mask.index_select(0, index)
        first = int(mask.any(dim=0).nonzero()[0])  # leading columns that are padding in every kept row
        self._mask = mask[:, first:]
        for layer in self._cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, first:]
            layer.values = layer.values.index_select(0, index)[:, :, first:]
        self._padded = bool((self._mask == 0).any())

    def step(self, forward: Callable[..., Any], tokens: list[int]) -> "torch.Tensor":
        """Feed one token per row (in row order) through `forward` (the model call); return next-token logits [B, V]."""
        import torch

        assert self._mask is not None and len(tokens) == len(self)
        device = self._mask.device
        positions = self._mask.sum(dim=1, keepdim=True)  # each row's next position: its count of real tokens
        mask = torch.cat([self._mask, torch.ones(len(tokens), 1, dtype=torch.long, device=device)], dim=1)
        out = forward(
            input_ids=torch.tensor(tokens, device=device).unsqueeze(1),
            cache=self._cache,
            use_cache=True,
            attention_mask=mask if self._padded else None,
            position_ids=positions,
        )
        self._mask = mask
        return out.logits[:, -1]
