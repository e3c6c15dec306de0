"""Incremental detokenization and stop-string handling for one generated sequence (pure; no torch).

`IncrementalDetokenizer` turns token ids into text deltas with vLLM's prefix/read-offset scheme: each step decodes
only a small window of recent ids, and holds text back while the window ends in an incomplete UTF-8 sequence
("\ufffd"). Decoding the whole text every step would cost O(T) per token.

`StopStringTracker` accumulates those deltas, finds stop strings (also across token boundaries), truncates the text
at the stop string (or after it with `include_stop_str_in_output`), and holds back the last `len(longest stop) - 1`
characters until they cannot start a stop string, as vLLM does, so streamed deltas never contain a stop string.

Not here: which token ends a sequence (EOS, `stop_token_ids`, length) — the engine decides that.
"""

from __future__ import annotations

from typing import Any

_CONTEXT_TOKENS = 5  # vLLM's INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET: prompt tokens kept as decoding context


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, prompt_ids: list[int], *, skip_special_tokens: bool) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids = list(prompt_ids[-_CONTEXT_TOKENS:])
        self._prefix = 0
        self._read = len(self._ids)

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip) if ids else ""

    def push(self, token_id: int) -> str:
        """Add one token; return the newly completed text (possibly "")."""
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        new_text = self._decode(self._ids[self._prefix :])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            return new_text[len(prefix_text) :]
        return ""

    def flush(self) -> str:
        """Text still held back (an incomplete UTF-8 tail decodes to "\ufffd"); call once when the sequence ends."""
        if self._read == len(self._ids):
            return ""
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        new_text = self._decode(self._ids[self._prefix :])
        self._prefix, self._read = self._read, len(self._ids)
        return new_text[len(prefix_text) :]


class StopStringTracker:
    def __init__(self, stop: tuple[str, ...], *, include_stop_str: bool) -> None:
        self._stop = stop
        self._include = include_stop_str
        self._longest = max((len(s) for s in stop), default=0)
        self._holdback = self._longest - 1 if stop and not include_stop_str else 0
        self.text = ""
        self._emitted = 0

    def add(self, delta: str) -> tuple[str, str | None]:
        """Append `delta`; return (text safe to emit now, the stop string that matched or None)."""
        if not delta:
            return "", None
        search_from = max(0, len(self.text) - self._longest + 1)
        self.text += delta
        if self._stop:
            best: tuple[int, str] | None = None
            for s in self._stop:
                idx = self.text.find(s, search_from)
                if idx != -1 and (best is None or idx < best[0]):
                    best = (idx, s)
            if best is not None:
                idx, s = best
                self.text = self.text[: idx + len(s) if self._include else idx]
                return self.flush(), s
        upto = len(self.text) - self._holdback
        if upto <= self._emitted:
            return "", None
        out = self.text[self._emitted : upto]
        self._emitted = upto
        return out, None

    def flush(self) -> str:
        """Everything not yet emitted (call when the sequence ends for any reason)."""
        out = self.text[self._emitted :]
        self._emitted = len(self.text)
        return out
