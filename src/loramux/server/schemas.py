"""Request bodies of the OpenAI API (the parts loramux serves) and the response objects it returns.

Pydantic checks the *shape* (types, required fields: 422 when wrong); ``check_*`` functions check
the *values* (ranges, unsupported options: 400), because the OpenAI API and vLLM answer an
out-of-range value with 400. Unknown fields are ignored, as the OpenAI API does for clients that
send newer options; options that would change the answer and that loramux does not implement
(``n`` > 1, ``logprobs``, ``echo``, ``best_of``, ``suffix``, tools) are refused with 400 rather
than silently dropped.
"""
from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict

from .errors import APIError


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class _SamplingFields(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # vLLM extension; 0 or -1 = off
    seed: int | None = None
    stop: Union[str, list[str], None] = None
    stop_token_ids: list[int] | None = None  # vLLM extension
    ignore_eos: bool | None = None  # vLLM extension: run to max_tokens (benchmarks)
    n: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    logprobs: Any = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    user: str | None = None


class CompletionRequest(_SamplingFields):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    echo: bool | None = None
    best_of: int | None = None
    suffix: str | None = None


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[TextPart], None] = None
    name: str | None = None


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    tools: list[Any] | None = None
    top_logprobs: int | None = None


class LoadLoraRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    lora_name: str
    lora_path: str


class UnloadLoraRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    lora_name: str
    lora_path: str | None = None


# ---------------------------------------------------------------------------------------------
# value checks (400)


def check_sampling(req: _SamplingFields, *, max_stop: int) -> None:
    """Raise APIError(400) naming the first parameter whose value loramux cannot serve."""
    if req.n not in (None, 1):
        raise APIError(400, f"n ({req.n}) must be 1: loramux returns one choice per request", param="n")
    if req.max_tokens is not None and req.max_tokens < 1:
        raise APIError(400, f"max_tokens ({req.max_tokens}) must be >= 1", param="max_tokens")
    if req.temperature is not None and not 0.0 <= req.temperature <= 2.0:
        raise APIError(400, f"temperature ({req.temperature}) must be between 0 and 2", param="temperature")
    if req.top_p is not None and not 0.0 < req.top_p <= 1.0:
        raise APIError(400, f"top_p ({req.top_p}) must be in (0, 1]", param="top_p")
    if req.top_k is not None and req.top_k < -1:
        raise APIError(400, f"top_k ({req.top_k}) must be >= 0 (0 or -1 = off)", param="top_k")
    if req.seed is not None and not 0 <= req.seed < 2**63:
        raise APIError(400, f"seed ({req.seed}) must be an integer in [0, 2**63)", param="seed")
    stops = stop_list(req.stop)
    if len(stops) > max_stop:
        raise APIError(400, f"stop has {len(stops)} sequences; at most {max_stop} are allowed", param="stop")
    if any(s == "" for s in stops):
        raise APIError(400, "stop sequences must be non-empty strings", param="stop")
    if req.stop_token_ids and any(t < 0 for t in req.stop_token_ids):
        raise APIError(400, "stop_token_ids must be non-negative token ids", param="stop_token_ids")
    if req.logprobs not in (None, False, 0):
        raise APIError(400, "logprobs are not supported by loramux", param="logprobs")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(req, name) not in (None, 0, 0.0):
            raise APIError(400, f"{name} is not supported by loramux (use 0 or leave it out)", param=name)


def check_completion(req: CompletionRequest, *, max_stop: int) -> str | list[int]:
    """Check a completion request; return its single prompt (text or token ids)."""
    check_sampling(req, max_stop=max_stop)
    if req.echo:
        raise APIError(400, "echo is not supported by loramux", param="echo")
    if req.best_of not in (None, 1):
        raise APIError(400, f"best_of ({req.best_of}) must be 1", param="best_of")
    if req.suffix:
        raise APIError(400, "suffix is not supported by loramux", param="suffix")
    prompt = req.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise APIError(400, f"prompt holds {len(prompt)} prompts; send one prompt per request", param="prompt")
        prompt = prompt[0]
    if isinstance(prompt, list):
        if not prompt:
            raise APIError(400, "prompt is an empty list of token ids", param="prompt")
        if any(t < 0 for t in prompt):
            raise APIError(400, "prompt token ids must be non-negative", param="prompt")
    return prompt


def check_chat(req: ChatCompletionRequest, *, max_stop: int) -> list[dict[str, str]]:
    """Check a chat request; return the messages as plain dicts for the chat template."""
    check_sampling(req, max_stop=max_stop)
    if req.max_completion_tokens is not None and req.max_completion_tokens < 1:
        raise APIError(400, f"max_completion_tokens ({req.max_completion_tokens}) must be >= 1",
                       param="max_completion_tokens")
    if req.tools:
        raise APIError(400, "tools are not supported by loramux", param="tools")
    if req.top_logprobs:
        raise APIError(400, "top_logprobs is not supported by loramux", param="top_logprobs")
    if not req.messages:
        raise APIError(400, "messages is empty; send at least one message", param="messages")
    messages = []
    for i, msg in enumerate(req.messages):
        content = msg.content
        if isinstance(content, list):
            texts = []
            for part in content:
                if part.type != "text" or part.text is None:
                    raise APIError(400, f"messages.{i}.content: only text parts are supported, got {part.type!r}",
                                   param="messages")
                texts.append(part.text)
            content = "".join(texts)
        messages.append({"role": msg.role, "content": content or ""})
    return messages


def stop_list(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(stop)


# ---------------------------------------------------------------------------------------------
# response objects (plain dicts: they go straight to JSON)


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_object(rid: str, created: int, model: str, text: str, finish: str | None,
                      use: dict[str, int] | None, *, chunk: bool = False) -> dict[str, Any]:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
            **({"usage": use} if use is not None or not chunk else {})}


def chat_object(rid: str, created: int, model: str, text: str, finish: str | None,
                use: dict[str, int]) -> dict[str, Any]:
    return {"id": rid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "logprobs": None, "finish_reason": finish}],
            "usage": use}


def chat_chunk(rid: str, created: int, model: str, delta: dict[str, str] | None, finish: str | None,
               use: dict[str, int] | None = None, *, no_choices: bool = False) -> dict[str, Any]:
    choices = [] if no_choices else [{"index": 0, "delta": delta or {}, "logprobs": None, "finish_reason": finish}]
    out: dict[str, Any] = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                           "choices": choices}
    if use is not None:
        out["usage"] = use
    return out
