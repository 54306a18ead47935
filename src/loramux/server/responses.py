"""The OpenAI response objects and stream chunks, as plain dicts (they go straight to JSON).

Shapes follow the OpenAI API (and vLLM): ``choices[].index`` numbers the choices (``prompt * n + i``
for several prompts), ``logprobs`` is ``null`` unless asked for, a stream's chunks carry no
``usage`` unless ``stream_options.include_usage`` (then ``usage: null`` on every chunk and one
final chunk with empty ``choices`` and the totals).
"""
from __future__ import annotations

from typing import Any, Optional


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_choice(index: int, text: str, finish: Optional[str], logprobs: Optional[dict] = None) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}


def chat_choice(index: int, text: str, finish: Optional[str], logprobs: Optional[list] = None) -> dict[str, Any]:
    return {"index": index, "message": {"role": "assistant", "content": text},
            "logprobs": None if logprobs is None else {"content": logprobs, "refusal": None},
            "finish_reason": finish}


def _envelope(kind: str, rid: str, created: int, model: str, choices: list[dict], with_usage: bool,
              use: Optional[dict[str, int]]) -> dict[str, Any]:
    """The fields every response object and stream chunk shares; ``usage`` only ``with_usage``."""
    out: dict[str, Any] = {"id": rid, "object": kind, "created": created, "model": model, "choices": choices}
    if with_usage:
        out["usage"] = use
    return out


def completion_object(rid: str, created: int, model: str, choices: list[dict], use: dict[str, int]) -> dict[str, Any]:
    return _envelope("text_completion", rid, created, model, choices, True, use)


def chat_object(rid: str, created: int, model: str, choices: list[dict], use: dict[str, int]) -> dict[str, Any]:
    return _envelope("chat.completion", rid, created, model, choices, True, use)


def completion_chunk(rid: str, created: int, model: str, choices: list[dict], *, with_usage: bool,
                     use: Optional[dict[str, int]] = None) -> dict[str, Any]:
    return _envelope("text_completion", rid, created, model, choices, with_usage, use)


def chat_chunk_choice(index: int, delta: dict[str, str], finish: Optional[str],
                      logprobs: Optional[list] = None) -> dict[str, Any]:
    return {"index": index, "delta": delta, "logprobs": None if logprobs is None else {"content": logprobs, "refusal": None},
            "finish_reason": finish}


def chat_chunk(rid: str, created: int, model: str, choices: list[dict], *, with_usage: bool,
               use: Optional[dict[str, int]] = None) -> dict[str, Any]:
    return _envelope("chat.completion.chunk", rid, created, model, choices, with_usage, use)
