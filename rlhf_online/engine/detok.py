"""Incremental detokenization: safe text deltas for streaming, and stop-string detection."""

from __future__ import annotations

from typing import Any


class IncrementalText:
    """Turns a growing list of token ids into text deltas that never need to be taken back.

    A delta is held back while the text ends in an incomplete UTF-8 sequence (shown by the
    tokenizer as U+FFFD) or in a prefix of a stop string, since the next token may complete it.
    """

    def __init__(self, tokenizer: Any, stop: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0  # characters of self.text already handed out
        self._longest_stop = max((len(s) for s in stop), default=0)

    def add(self, token_id: int) -> bool:
        """Append a token; return True when a stop string appeared (text is cut before it)."""
        self.ids.append(token_id)
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if not self.stop:
            return False
        # Only the tail can hold a stop string that was not there before this token.
        start = max(0, self.emitted - self._longest_stop)
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            return True
        return False

    def delta(self, final: bool = False) -> str:
        """The text that can be emitted now; everything left when `final`."""
        # U+FFFD at the end is an incomplete UTF-8 sequence: the next token completes it, and a
        # sequence cut off there (by max_new_tokens) never will, so it is not text either way.
        end = len(self.text.rstrip("\ufffd"))
        if not final:
            end = min(end, self._safe_end())
        end = max(end, self.emitted)
        out = self.text[self.emitted : end]
        self.emitted = end
        return out

    def _safe_end(self) -> int:
        """Index before any suffix of the text that could still grow into a stop string."""
        for k in range(min(self._longest_stop - 1, len(self.text)), 0, -1):
            tail = self.text[-k:]
            if any(s.startswith(tail) for s in self.stop):
                return len(self.text) - k
        return len(self.text)
