"""Request bodies of the OpenAI API (the parts loramux serves) and the response models it documents.

Pydantic checks the *shape* (types, required fields); ``validation.py`` checks the *values*
(ranges, unsupported options). Both answer 400 ``invalid_request_error`` with ``param`` naming the
field, as the OpenAI API and vLLM do. Extra fields are kept (``extra="allow"``) so that
``validation.py`` can refuse the ones loramux would otherwise drop silently, by name.

The response models are for the OpenAPI schema (``/openapi.json``, ``/docs``) and for clients that
generate code from it; the routes build plain dicts (``responses.py``) and return them directly.
"""
from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class StreamOptions(_Open):
    include_usage: Optional[bool] = None  # null = false (vLLM and OpenAI accept it)
    continuous_usage_stats: Optional[bool] = None  # vLLM; only false (or absent) is served


class JsonSchemaSpec(_Open):
    name: Optional[str] = None
    description: Optional[str] = None
    # ``schema`` shadows a BaseModel attribute; the alias keeps the wire name
    schema_: Optional[dict[str, Any]] = Field(default=None, alias="schema")
    strict: Optional[bool] = None


class ResponseFormat(_Open):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JsonSchemaSpec] = None


class _SamplingFields(_Open):
    model: str
    max_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None  # vLLM extension; 0 or -1 = off
    seed: Optional[int] = None
    stop: Union[str, list[str], None] = None
    stop_token_ids: Optional[list[int]] = None  # vLLM extension
    ignore_eos: Optional[bool] = None  # vLLM extension: run to max_tokens (benchmarks)
    n: Optional[int] = None
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    logit_bias: Optional[dict[str, float]] = None
    response_format: Optional[ResponseFormat] = None
    user: Optional[str] = None


class CompletionRequest(_SamplingFields):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    logprobs: Optional[int] = None  # 0-5 in OpenAI, up to 20 here (as vLLM)
    echo: Optional[bool] = None
    best_of: Optional[int] = None
    suffix: Optional[str] = None


class TextPart(_Open):
    type: str
    text: Optional[str] = None


class ChatMessage(_Open):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[TextPart], None] = None
    name: Optional[str] = None


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage]
    max_completion_tokens: Optional[int] = None
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = None
    tools: Optional[list[Any]] = None
    tool_choice: Optional[Any] = None


class LoadLoraRequest(_Open):
    lora_name: str
    lora_path: str
    load_inplace: Optional[bool] = None  # vLLM: swap an existing name's weights (hot reload)


class UnloadLoraRequest(_Open):
    lora_name: str
    lora_path: Optional[str] = None


# ---------------------------------------------------------------------------------------------
# response models (documentation; the routes return dicts of exactly these shapes)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[Optional[float]]
    top_logprobs: list[Optional[dict[str, float]]]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: Optional[CompletionLogprobs] = None
    finish_reason: Optional[str] = None


class CompletionResponse(BaseModel):
    """``/v1/completions``; with ``stream: true`` the body is SSE of the same object per chunk."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Optional[Usage] = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: Optional[list[int]] = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: Optional[list[ChatTokenLogprob]] = None
    refusal: Optional[list[ChatTokenLogprob]] = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: Optional[str] = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: Optional[ChatLogprobs] = None
    finish_reason: Optional[str] = None


class ChatCompletionResponse(BaseModel):
    """``/v1/chat/completions``; with ``stream: true`` SSE ``chat.completion.chunk`` objects."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    root: Optional[str] = None
    parent: Optional[str] = None
    permission: list[Any] = []


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Health(BaseModel):
    status: str


ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse} for status in (400, 401, 403, 404, 413, 503)}
