"""The engine's ``TokenLogprob`` records in OpenAI's two response shapes.

``/v1/completions`` (the legacy shape)::

    {"tokens": ["Hel", "lo"], "token_logprobs": [-0.1, -2.3], "top_logprobs": [{"Hel": -0.1, ...}, ...],
     "text_offset": [0, 3]}

with echo, the prompt's tokens come first and its first token has ``null`` logprob and top entry.
``/v1/chat/completions``::

    {"content": [{"token": "Hel", "logprob": -0.1, "bytes": [72, 101, 108],
                  "top_logprobs": [{"token": "Hel", "logprob": -0.1, "bytes": [...]}, ...]}], "refusal": null}

Token strings are the tokenizer's decoding of the single token (as vLLM does); a token that is only
part of a UTF-8 character decodes to U+FFFD, and its ``bytes`` are those of that string.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence


class TokenStrings:
    """``token_id -> str`` through the tokenizer, memoised (a response names the same ids many times)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._memo: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._memo.get(token_id)
        if text is None:
            if self.tokenizer is None:
                text = f"token_id:{token_id}"
            else:
                text = self.tokenizer.decode([token_id], skip_special_tokens=False)
            self._memo[token_id] = text
        return text


class CompletionLogprobs:
    """Accumulates the legacy shape over deltas; ``offset`` runs on from the text already returned."""

    def __init__(self, strings: TokenStrings, offset: int = 0) -> None:
        self.strings = strings
        self.offset = offset

    def block(self, records: Sequence[Any], *, first_is_prompt_start: bool = False) -> dict[str, list]:
        """One ``logprobs`` object for ``records`` (``None`` entries: positions without a logprob)."""
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for rec in records:
            self._add(out, rec)
        return out

    def prompt_block(self, prompt_ids: Sequence[int], records: Optional[Sequence[Any]]) -> dict[str, list]:
        """The echoed prompt: its tokens, ``None`` for the first (nothing predicts it)."""
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        records = list(records or [])
        for i, token in enumerate(prompt_ids):
            rec = records[i] if i < len(records) else None
            if rec is None:
                text = self.strings(token)
                out["tokens"].append(text)
                out["token_logprobs"].append(None)
                out["top_logprobs"].append(None)
                out["text_offset"].append(self.offset)
                self.offset += len(text)
            else:
                self._add(out, rec)
        return out

    def _add(self, out: dict[str, list], rec: Any) -> None:
        text = self.strings(rec.token_id)
        out["tokens"].append(text)
        out["token_logprobs"].append(_finite(rec.logprob))
        top: dict[str, float] = {}
        for token_id, logprob in rec.top:
            top.setdefault(self.strings(token_id), _finite(logprob))
        out["top_logprobs"].append(top)
        out["text_offset"].append(self.offset)
        self.offset += len(text)


def merge(blocks: Sequence[dict[str, list]]) -> dict[str, list]:
    out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for block in blocks:
        for key in out:
            out[key].extend(block[key])
    return out


def chat_content(strings: TokenStrings, records: Sequence[Any]) -> list[dict[str, Any]]:
    """The ``logprobs.content`` list of a chat choice (or chunk) for ``records``."""
    content = []
    for rec in records:
        text = strings(rec.token_id)
        content.append({"token": text, "logprob": _finite(rec.logprob), "bytes": list(text.encode("utf-8")),
                        "top_logprobs": [{"token": strings(t), "logprob": _finite(lp),
                                          "bytes": list(strings(t).encode("utf-8"))} for t, lp in rec.top]})
    return content


def _finite(x: float) -> float:
    """JSON has no -inf: a token the model gives probability 0 gets OpenAI's floor (-9999.0)."""
    x = float(x)
    return x if x > -9999.0 else -9999.0
