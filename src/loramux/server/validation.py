"""Value checks of completion and chat requests: 400 naming the parameter, before anything runs.

Every option a client can send is either served, accepted because it cannot change the answer
(``user``, ``metadata``...), or refused by name: an option loramux would silently drop
(``presence_penalty: 0.5``, an unknown field) is a 400, never an answer computed without it.
Strings are checked for lone surrogates here (``"\\ud800"`` is valid JSON but not UTF-8; the
tokenizer would raise deep inside), so a bad prompt is a clean 400 on a connection that stays open.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

from . import schemas
from .errors import APIError

MAX_N = 16  # the engine contract's bound on n
MAX_LOGPROBS = 20  # vLLM's default max_logprobs; OpenAI allows 5 (completions) / 20 (chat)
MAX_PROMPTS = 64  # prompts in one /v1/completions call

# fields that never change the output: accepted and ignored (OpenAI and vLLM clients send them)
_IGNORED = {"user", "metadata", "store", "service_tier", "request_id", "priority", "skip_special_tokens",
            "spaces_between_special_tokens", "parallel_tool_calls", "stream_options"}
# fields loramux knows but serves only at their neutral value: name -> neutral values
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0), "repetition_penalty": (None, 1, 1.0),
    "min_p": (None, 0, 0.0), "min_tokens": (None, 0), "length_penalty": (None, 1, 1.0),
    "use_beam_search": (None, False), "include_stop_str_in_output": (None, False), "add_generation_prompt": (None, True),
    "continue_final_message": (None, False), "add_special_tokens": (None, False), "echo": (None, False),
    "prompt_logprobs": (None,), "truncate_prompt_tokens": (None,), "guided_json": (None,), "guided_regex": (None,),
    "guided_choice": (None,), "guided_grammar": (None,), "structured_outputs": (None,), "suffix": (None, ""),
    "tools": (None, []), "tool_choice": (None, "none", "auto"), "functions": (None, []), "function_call": (None, "none"),
    "audio": (None,), "modalities": (None, ["text"]), "prediction": (None,), "web_search_options": (None,),
    "reasoning_effort": (None,), "verbosity": (None,), "chat_template": (None,), "chat_template_kwargs": (None, {}),
    "documents": (None,), "mm_processor_kwargs": (None,), "bad_words": (None, []), "allowed_token_ids": (None,),
    "return_tokens_as_token_ids": (None, False), "best_of": (None, 1), "stop_token_ids": (None, []),
}


@dataclass
class Spec:
    """What a checked request asks for, in the server's terms (the engine's params come from this)."""

    prompts: list[str | list[int]]  # completions: one or more; chat: filled in by the route
    n: int = 1
    max_tokens: Optional[int] = None  # None: the endpoint's default, clamped to the context left
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: Optional[int] = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logit_bias: dict[int, float] = field(default_factory=dict)
    logprobs: Optional[int] = None  # top-k alternatives per generated token; None = off
    echo: bool = False
    prompt_logprobs: Optional[int] = None  # completions with echo and logprobs
    response_format: Optional[schemas.ResponseFormat] = None
    stream: bool = False
    include_usage: bool = False
    messages: list[dict[str, str]] = field(default_factory=list)


def _bad(message: str, param: str, code: str = "invalid_parameter") -> APIError:
    return APIError(400, message, param=param, code=code)


def check_text(value: str, param: str) -> str:
    """Refuse strings that are not encodable as UTF-8 (lone surrogates)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise _bad(f"{param} holds a lone surrogate ({value[exc.start:exc.end]!r} at position {exc.start}); "
                   "send valid UTF-8 text", param, "invalid_text") from None
    return value


def _check_options(req: schemas._SamplingFields, served: set[str]) -> None:
    """Refuse options loramux cannot honour (named), and unknown fields."""
    fields = set(type(req).model_fields)
    for name in sorted((fields | set(req.model_extra or {})) - served - _IGNORED):
        value = getattr(req, name, None) if name in fields else (req.model_extra or {}).get(name)
        if name in _NEUTRAL:
            if any(_same(value, v) for v in _NEUTRAL[name]):
                continue
            raise _bad(f"{name} ({value!r}) is not supported by loramux; leave it out", name, "unsupported_parameter")
        if name not in fields:
            raise _bad(f"unrecognized request argument {name!r}: loramux does not implement it (it would be ignored); "
                       "leave it out", name, "unsupported_parameter")


def _same(value: Any, neutral: Any) -> bool:
    if neutral is None or isinstance(neutral, bool) or isinstance(value, bool):
        return value is neutral
    return type(value) in (int, float, str, list, dict) and value == neutral


_SERVED_COMMON = {"model", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stop_token_ids",
                  "ignore_eos", "n", "stream", "logit_bias", "response_format"}


def _common(req: schemas._SamplingFields, spec: Spec, *, max_stop: int) -> None:
    if req.n is not None and not 1 <= req.n <= MAX_N:
        raise _bad(f"n ({req.n}) must be between 1 and {MAX_N}", "n")
    spec.n = req.n or 1
    if req.max_tokens is not None and req.max_tokens < 1:
        raise _bad(f"max_tokens ({req.max_tokens}) must be >= 1", "max_tokens")
    spec.max_tokens = req.max_tokens
    if req.temperature is not None:
        if not 0.0 <= req.temperature <= 2.0:
            raise _bad(f"temperature ({req.temperature}) must be between 0 and 2", "temperature")
        spec.temperature = 0.0 if req.temperature < 1e-5 else req.temperature  # near zero: greedy
    if req.top_p is not None:
        if not 0.0 < req.top_p <= 1.0:
            raise _bad(f"top_p ({req.top_p}) must be in (0, 1]", "top_p")
        spec.top_p = req.top_p
    if req.top_k is not None:
        if req.top_k < -1:
            raise _bad(f"top_k ({req.top_k}) must be >= 0 (0 or -1 = off)", "top_k")
        spec.top_k = max(req.top_k, 0)
    if req.seed is not None and not 0 <= req.seed < 2**63:
        raise _bad(f"seed ({req.seed}) must be an integer in [0, 2**63)", "seed")
    spec.seed = req.seed
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stops) > max_stop:
        raise _bad(f"stop has {len(stops)} sequences; at most {max_stop} are allowed", "stop")
    if any(s == "" for s in stops):
        raise _bad("stop sequences must be non-empty strings", "stop")
    spec.stop = [check_text(s, "stop") for s in stops]
    if req.stop_token_ids and any(t < 0 for t in req.stop_token_ids):
        raise _bad("stop_token_ids must be non-negative token ids", "stop_token_ids")
    spec.stop_token_ids = list(req.stop_token_ids or [])
    spec.ignore_eos = bool(req.ignore_eos)
    for key, bias in (req.logit_bias or {}).items():
        try:
            token = int(key)
        except ValueError:
            raise _bad(f"logit_bias key {key!r} is not a token id (a string holding an integer)", "logit_bias") from None
        if token < 0:
            raise _bad(f"logit_bias key {key!r} must be a non-negative token id", "logit_bias")
        if not (isinstance(bias, (int, float)) and math.isfinite(bias) and -100 <= bias <= 100):
            raise _bad(f"logit_bias value for token {token} ({bias!r}) must be between -100 and 100", "logit_bias")
        spec.logit_bias[token] = float(bias)
    rf = req.response_format
    if rf is not None and rf.type != "text":
        if rf.type == "json_schema" and (rf.json_schema is None or not isinstance(rf.json_schema.schema_, dict)):
            raise _bad("response_format type 'json_schema' needs json_schema.schema (a JSON Schema object)",
                       "response_format")
        spec.response_format = rf
    spec.stream = bool(req.stream)
    opts = req.stream_options
    if opts is not None:
        if not spec.stream:
            raise _bad("stream_options is only allowed with stream: true", "stream_options")
        if opts.continuous_usage_stats:
            raise _bad("stream_options.continuous_usage_stats is not supported by loramux (usage comes in the "
                       "final chunk)", "stream_options")
        if opts.model_extra:
            raise _bad(f"stream_options.{next(iter(opts.model_extra))} is not supported by loramux", "stream_options")
        spec.include_usage = bool(opts.include_usage)


def check_completion(req: schemas.CompletionRequest, *, max_stop: int) -> Spec:
    """Check a completion request; its prompts (texts or token ids), one choice per prompt and n."""
    _check_options(req, _SERVED_COMMON | {"prompt", "logprobs", "echo", "best_of", "suffix"})
    spec = Spec(prompts=[])
    _common(req, spec, max_stop=max_stop)
    if req.best_of is not None and req.best_of != spec.n:
        raise _bad(f"best_of ({req.best_of}) must equal n ({spec.n}): loramux does not rank extra candidates",
                   "best_of", "unsupported_parameter")
    if req.suffix:
        raise _bad("suffix is not supported by loramux (no fill-in-the-middle)", "suffix", "unsupported_parameter")
    if req.logprobs is not None:
        if not 0 <= req.logprobs <= MAX_LOGPROBS:
            raise _bad(f"logprobs ({req.logprobs}) must be between 0 and {MAX_LOGPROBS}", "logprobs")
        spec.logprobs = req.logprobs
    spec.echo = bool(req.echo)
    if spec.echo and spec.logprobs is not None:
        spec.prompt_logprobs = spec.logprobs
    prompt = req.prompt
    if isinstance(prompt, str):
        prompts: list[Any] = [prompt]
    elif prompt and all(isinstance(p, int) for p in prompt):
        prompts = [list(prompt)]
    else:
        prompts = list(prompt)
    if not prompts:
        raise _bad("prompt is empty; send a string, a list of strings or a list of token-id lists", "prompt")
    if len(prompts) > MAX_PROMPTS:
        raise _bad(f"prompt holds {len(prompts)} prompts; at most {MAX_PROMPTS} are allowed in one request", "prompt")
    if len(prompts) * spec.n > MAX_N * 4:
        raise _bad(f"{len(prompts)} prompts x n={spec.n} is {len(prompts) * spec.n} choices; at most {MAX_N * 4} "
                   "are allowed in one request", "n")
    for i, p in enumerate(prompts):
        where = "prompt" if len(prompts) == 1 else f"prompt.{i}"
        if isinstance(p, str):
            if not p:
                raise _bad(f"{where} is an empty string", "prompt")
            check_text(p, "prompt")
        else:
            if not p:
                raise _bad(f"{where} is an empty list of token ids", "prompt")
            if any(t < 0 for t in p):
                raise _bad(f"{where}: token ids must be non-negative", "prompt")
    spec.prompts = prompts
    return spec


def check_chat(req: schemas.ChatCompletionRequest, *, max_stop: int) -> Spec:
    """Check a chat request; the messages as plain dicts for the chat template."""
    _check_options(req, _SERVED_COMMON | {"messages", "max_completion_tokens", "logprobs", "top_logprobs"})
    spec = Spec(prompts=[])
    _common(req, spec, max_stop=max_stop)
    if req.max_completion_tokens is not None:
        if req.max_completion_tokens < 1:
            raise _bad(f"max_completion_tokens ({req.max_completion_tokens}) must be >= 1", "max_completion_tokens")
        spec.max_tokens = req.max_completion_tokens
    if req.top_logprobs is not None:
        if not 0 <= req.top_logprobs <= MAX_LOGPROBS:
            raise _bad(f"top_logprobs ({req.top_logprobs}) must be between 0 and {MAX_LOGPROBS}", "top_logprobs")
        if not req.logprobs:
            raise _bad("top_logprobs needs logprobs: true", "top_logprobs")
    if req.logprobs:
        spec.logprobs = req.top_logprobs or 0
    if not req.messages:
        raise _bad("messages is empty; send at least one message", "messages")
    for i, msg in enumerate(req.messages):
        content = msg.content
        if isinstance(content, list):
            texts = []
            for part in content:
                if part.type != "text" or part.text is None:
                    raise _bad(f"messages.{i}.content: only text parts are supported, got {part.type!r}", "messages")
                texts.append(part.text)
            content = "".join(texts)
        check_text(content or "", f"messages.{i}.content")
        spec.messages.append({"role": msg.role, "content": content or ""})
    return spec
