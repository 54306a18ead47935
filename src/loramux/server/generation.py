"""One completion or chat request: submit to the engine, then answer in one body or as SSE.

The engine does all the work (tokenizing, batching, sampling, stop strings, detokenizing); this
module only translates: OpenAI parameters -> ``SamplingParams``, engine exceptions -> HTTP errors,
``RequestOutput`` deltas -> OpenAI objects or chunks. The first delta is awaited before any byte
is sent so that a request that fails early (its adapter cannot be loaded) still gets a proper
status instead of a broken 200 stream.
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

from fastapi.responses import JSONResponse, Response
from starlette.requests import Request

from . import schemas
from .errors import APIError, error_body
from .streaming import ClientDisconnected, EventStreamResponse, sse, until_disconnect

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationCall:
    """What a route hands over: the resolved model, the prompt and the OpenAI options."""

    endpoint: str  # "completions" | "chat"
    model: str  # the client's model name (echoed back)
    adapter: str | None  # engine adapter name; None = base model
    prompt: str | list[int]
    params: Any  # engine SamplingParams
    stream: bool
    include_usage: bool


def request_id(endpoint: str) -> str:
    return ("chatcmpl-" if endpoint == "chat" else "cmpl-") + uuid.uuid4().hex


def _first_error(out: Any) -> str | None:
    if getattr(out, "error", None):
        return str(out.error)
    if getattr(out, "finish_reason", None) == "error":
        return "the engine failed this request"
    return None


async def run_generation(state: Any, request: Request, call: GenerationCall,
                         submit: Callable[[], Any]) -> Response:
    """Submit (``submit()`` returns an engine handle) and answer; errors become APIError."""
    arrived = time.perf_counter()
    handle = await asyncio.to_thread(submit)  # the engine tokenizes text prompts: keep that off the event loop
    metrics = state.metrics
    stream_iter: AsyncIterator[Any] = handle.stream().__aiter__()
    try:
        first = await until_disconnect(request, stream_iter.__anext__(), handle.cancel)
    except ClientDisconnected:
        metrics.finished(call.model, call.endpoint, "abort", 0, 0, time.perf_counter() - arrived)
        return _Gone()
    except StopAsyncIteration:
        raise APIError(500, "the engine ended the request without output", code="engine_error") from None
    error = _first_error(first)
    if error is not None:
        handle.cancel()
        metrics.finished(call.model, call.endpoint, "error", 0, 0, time.perf_counter() - arrived)
        raise state.output_error(call, error)
    if getattr(first, "text", ""):
        metrics.ttft.observe(time.perf_counter() - arrived)

    rid, created = request_id(call.endpoint), int(time.time())
    if not call.stream:
        try:
            final = await until_disconnect(request, _collect(first, stream_iter), handle.cancel)
        except ClientDisconnected:
            metrics.finished(call.model, call.endpoint, "abort", 0, 0, time.perf_counter() - arrived)
            return _Gone()
        text, finish, ptok, ctok, err = final
        metrics.finished(call.model, call.endpoint, finish, ptok, ctok, time.perf_counter() - arrived)
        if err is not None:
            raise state.output_error(call, err)
        use = schemas.usage(ptok, ctok)
        if call.endpoint == "chat":
            body = schemas.chat_object(rid, created, call.model, text, finish, use)
        else:
            body = schemas.completion_object(rid, created, call.model, text, finish, use)
        return JSONResponse(body)

    events = _events(state, call, rid, created, first, stream_iter, arrived)
    return EventStreamResponse(events, on_close=handle.cancel)


class _Gone(Response):
    """The answer to a client that already left: sends nothing (the socket is closed)."""

    def __init__(self) -> None:
        super().__init__(status_code=499)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        return None


async def _collect(first: Any, rest: AsyncIterator[Any]) -> tuple[str, str | None, int, int, str | None]:
    parts, last = [first.text or ""], first
    if not first.finished:
        async for out in rest:
            parts.append(out.text or "")
            last = out
            if out.finished:
                break
    return "".join(parts), last.finish_reason, last.prompt_tokens or 0, last.completion_tokens or 0, _first_error(last)


async def _events(state: Any, call: GenerationCall, rid: str, created: int, first: Any,
                  rest: AsyncIterator[Any], arrived: float) -> AsyncIterator[str]:
    """SSE events: one chunk per engine delta, the finish reason, usage, then ``[DONE]``."""
    metrics, model = state.metrics, call.model
    chat = call.endpoint == "chat"
    last_t, saw_text = time.perf_counter(), bool(first.text)
    ptok = ctok = 0
    finish: str | None = None
    try:
        if chat:  # OpenAI's first chat chunk carries the role
            yield sse(schemas.chat_chunk(rid, created, model, {"role": "assistant", "content": ""}, None))
        out = first
        while True:
            err = _first_error(out)
            if err is not None:
                finish = "error"
                yield sse(state.output_error(call, err).body())
                break
            ptok, ctok = out.prompt_tokens or 0, out.completion_tokens or 0
            finish = out.finish_reason if out.finished else None
            use = schemas.usage(ptok, ctok) if finish is not None and not call.include_usage else None
            if out.text or finish is not None:
                if chat:
                    delta = {"content": out.text} if out.text else {}
                    yield sse(schemas.chat_chunk(rid, created, model, delta, finish, use))
                else:
                    yield sse(schemas.completion_object(rid, created, model, out.text or "", finish, use, chunk=True))
            if out.finished:
                break
            out = await rest.__anext__()
            now = time.perf_counter()
            if out.text:
                if saw_text:
                    metrics.itl.observe(now - last_t)
                else:
                    metrics.ttft.observe(now - arrived)
                saw_text, last_t = True, now
        if call.include_usage and finish != "error":
            use = schemas.usage(ptok, ctok)
            if chat:
                yield sse(schemas.chat_chunk(rid, created, model, None, None, use, no_choices=True))
            else:
                yield sse({"id": rid, "object": "text_completion", "created": created, "model": model,
                           "choices": [], "usage": use})
        yield sse("[DONE]")
    except StopAsyncIteration:
        finish = "error"
        yield sse(error_body(500, "the engine ended the stream early", code="engine_error"))
        yield sse("[DONE]")
    finally:
        metrics.finished(model, call.endpoint, finish or "abort", ptok, ctok, time.perf_counter() - arrived)
