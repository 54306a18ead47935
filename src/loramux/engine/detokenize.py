"""Turning a growing list of token ids into text deltas, and finding stop strings in it.

Decoding token by token is wrong for byte-level BPE (a character can span tokens, spaces attach
to the next token), so each step decodes the whole output and emits what was not emitted yet.
Two things are held back: a trailing U+FFFD (an incomplete UTF-8 sequence that the next token
completes) and any tail that could be the start of a stop string, so text that a stop string
later cuts off is never streamed.
"""
from __future__ import annotations

from typing import Any, Sequence


class IncrementalText:
    """Text deltas of one request's output tokens; ``tokenizer`` None yields no text."""

    def __init__(self, tokenizer: Any, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.emitted = 0  # characters of the decoded text already returned
        self.text = ""  # the decoded output so far (cut at a stop string once one is found)
        self.stopped = False

    def update(self, token_ids: Sequence[int]) -> str:
        """Decode ``token_ids`` (the whole output so far); return the new safe text delta.

        After the call, ``stopped`` tells whether a stop string matched; the text is then cut
        just before it and the delta ends there.
        """
        if self.tokenizer is None:
            return ""
        text = self.tokenizer.decode(list(token_ids), skip_special_tokens=True)
        if self.stop:
            # only the new part (plus an overlap as long as the longest stop string) can hold a new match
            start = max(0, self.emitted - max(len(s) for s in self.stop) + 1)
            hits = [i for i in (text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                self.text, self.stopped = text[: min(hits)], True
                return self._take(len(self.text))
        self.text = text
        safe = len(text)
        if text.endswith("\ufffd"):
            safe = len(text.rstrip("\ufffd"))
        safe -= self._partial_stop(text[:safe])
        return self._take(max(safe, self.emitted))

    def flush(self) -> str:
        """At the end of the request: whatever was held back (a partial stop string is real text then)."""
        return self._take(len(self.text))

    def _take(self, end: int) -> str:
        delta = self.text[self.emitted:end]
        self.emitted = max(self.emitted, end)
        return delta

    def _partial_stop(self, text: str) -> int:
        """Length of the longest tail of ``text`` that is a proper prefix of some stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best
