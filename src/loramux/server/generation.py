"""One completion or chat request: its engine requests, then the answer in one body or as SSE.

A call may hold several engine requests (one per prompt of a batch ``prompt``; each runs the ``n``
sequences of its prompt); their deltas are merged into one stream of ``(source, delta)``.
Choice ``index`` is ``prompt_index * n + i``. The first delta is awaited before any byte is sent, so
a request that fails early (its adapter cannot be loaded) still gets a proper status instead of a
broken 200 stream. Engine failures are mapped by ``failure.kind`` (``ServerState.output_error``).
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Optional

from fastapi.responses import JSONResponse, Response
from starlette.requests import Request

from . import logprobs as lp
from . import responses as rs
from .errors import APIError, error_body
from .streaming import ClientDisconnected, EventStreamResponse, sse, until_disconnect

logger = logging.getLogger(__name__)


@dataclass
class GenerationCall:
    """What a route hands over: the resolved model, the prompts as token ids and the options."""

    endpoint: str  # "completions" | "chat"
    model: str  # the client's model name (echoed back)
    adapter: Optional[str]  # engine adapter name; None = base model
    prompts: list[Any]  # token ids (or text when the server has no tokenizer), one per prompt
    params: list[Any]  # engine SamplingParams per prompt
    n: int
    stream: bool
    include_usage: bool
    echo_texts: Optional[list[str]] = None  # completions with echo: the prompt text per prompt
    logprobs: Optional[int] = None
    prompt_logprobs: bool = False


@dataclass
class Source:
    """One engine request of a call."""

    handle: Any
    prompt_index: int
    first_choice: int  # choice index of its sequence 0
    prompt_len: int
    prompt_ids: list[int]
    prompt_logprobs: Optional[list] = None


@dataclass
class ChoiceState:
    index: int
    source: Source
    parts: list[str] = field(default_factory=list)
    tokens: int = 0
    records: list[Any] = field(default_factory=list)
    finish: Optional[str] = None
    started: bool = False  # stream: the echo / role chunk went out
    offset: int = 0  # completions logprobs text_offset


def request_id(endpoint: str) -> str:
    return ("chatcmpl-" if endpoint == "chat" else "cmpl-") + uuid.uuid4().hex


def output_failed(out: Any) -> bool:
    """Whether a delta reports a failure (an abort is a finish reason, not an error)."""
    failure = getattr(out, "failure", None)
    if failure is not None:
        return getattr(failure.kind, "value", failure.kind) != "aborted"
    return bool(getattr(out, "error", None)) or getattr(out, "finish_reason", None) == "error"


async def _merge(sources: list[Source]) -> AsyncIterator[tuple[Source, Any]]:
    """Every delta of every source, in arrival order; ends when all sources have finished."""
    if len(sources) == 1:
        async for out in sources[0].handle.stream():
            yield sources[0], out
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(src: Source) -> None:
        try:
            async for out in src.handle.stream():
                await queue.put((src, out, None))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            await queue.put((src, None, exc))
            return
        await queue.put((src, None, None))

    tasks = [asyncio.ensure_future(pump(s)) for s in sources]
    live = len(sources)
    try:
        while live:
            src, out, exc = await queue.get()
            if out is None:
                if exc is not None:
                    raise exc
                live -= 1
                continue
            yield src, out
    finally:
        for task in tasks:
            task.cancel()


class _Run:
    """State of one call while it runs: sources, choices, counters."""

    def __init__(self, state: Any, call: GenerationCall, sources: list[Source]) -> None:
        self.state, self.call, self.sources = state, call, sources
        self.choices: dict[int, ChoiceState] = {}
        for src in sources:
            for i in range(call.n):
                self.choices[src.first_choice + i] = ChoiceState(src.first_choice + i, src)
        self.strings = lp.TokenStrings(state.tokenizer)

    def cancel(self) -> None:
        for src in self.sources:
            src.handle.cancel()

    def choice_of(self, src: Source, out: Any) -> ChoiceState:
        index = src.first_choice + int(getattr(out, "index", 0) or 0)
        return self.choices[index]

    def absorb(self, src: Source, out: Any) -> ChoiceState:
        """Record one delta on its choice; raise APIError if it reports a failure."""
        if output_failed(out):
            self.cancel()
            raise self.state.output_error(self.call, out)
        if getattr(out, "prompt_logprobs", None) and src.prompt_logprobs is None:
            src.prompt_logprobs = list(out.prompt_logprobs)
        choice = self.choice_of(src, out)
        choice.parts.append(out.text or "")
        choice.tokens += len(out.token_ids or ())
        if getattr(out, "logprobs", None):
            choice.records.extend(out.logprobs)
        if out.finished:
            choice.finish = out.finish_reason
        return choice

    def usage(self) -> dict[str, int]:
        return rs.usage(sum(s.prompt_len for s in self.sources),
                        sum(c.tokens for c in self.choices.values()))

    def finish_reason(self) -> str:
        reasons = [c.finish for c in self.choices.values()]
        return "abort" if "abort" in reasons else (reasons[0] or "abort")

    # -- one body --------------------------------------------------------------------------------
    def body(self, rid: str, created: int) -> dict[str, Any]:
        call, out = self.call, []
        for index in sorted(self.choices):
            c = self.choices[index]
            text = "".join(c.parts)
            if call.endpoint == "chat":
                records = lp.chat_content(self.strings, c.records) if call.logprobs is not None else None
                out.append(rs.chat_choice(index, text, c.finish, records))
                continue
            logprobs = None
            echo = call.echo_texts[c.source.prompt_index] if call.echo_texts is not None else None
            if call.logprobs is not None:
                acc = lp.CompletionLogprobs(self.strings)
                blocks = [acc.prompt_block(c.source.prompt_ids, (c.source.prompt_logprobs or [])[0:])] if echo is not None else []
                blocks.append(acc.block(c.records))
                logprobs = lp.merge(blocks)
            out.append(rs.completion_choice(index, (echo or "") + text, c.finish, logprobs))
        build = rs.chat_object if call.endpoint == "chat" else rs.completion_object
        return build(rid, created, call.model, out, self.usage())

    # -- stream chunks ---------------------------------------------------------------------------
    def chunk_choices(self, choice: ChoiceState, out: Any) -> list[dict[str, Any]]:
        """The chunk choice(s) for one absorbed delta (echo and role first, where they are due)."""
        call, chat = self.call, self.call.endpoint == "chat"
        finish = out.finish_reason if out.finished else None
        new_records = list(getattr(out, "logprobs", None) or [])
        items: list[dict[str, Any]] = []
        if chat:
            if not choice.started:
                choice.started = True
                items.append(rs.chat_chunk_choice(choice.index, {"role": "assistant", "content": ""}, None))
            if out.text or finish is not None or (call.logprobs is not None and new_records):
                records = lp.chat_content(self.strings, new_records) if call.logprobs is not None else None
                items.append(rs.chat_chunk_choice(choice.index, {"content": out.text} if out.text else {}, finish, records))
            return items
        prefix, blocks = "", []
        acc = lp.CompletionLogprobs(self.strings, choice.offset)
        if not choice.started:
            choice.started = True
            if call.echo_texts is not None:
                prefix = call.echo_texts[choice.source.prompt_index]
                if call.logprobs is not None:
                    blocks.append(acc.prompt_block(choice.source.prompt_ids, choice.source.prompt_logprobs))
        if call.logprobs is not None:
            blocks.append(acc.block(new_records))
            choice.offset = acc.offset
        if prefix or out.text or finish is not None or (call.logprobs is not None and new_records):
            logprobs = lp.merge(blocks) if call.logprobs is not None else None
            items.append(rs.completion_choice(choice.index, prefix + (out.text or ""), finish, logprobs))
        return items


async def run_generation(state: Any, request: Request, call: GenerationCall) -> Response:
    """Submit every engine request of ``call`` and answer; errors become APIError."""
    arrived = time.perf_counter()
    sources: list[Source] = await asyncio.to_thread(state.submit, call)  # tokenizing: off the event loop
    run = _Run(state, call, sources)
    metrics = state.metrics
    merged = _merge(sources).__aiter__()
    try:
        src, first = await until_disconnect(request, merged.__anext__(), run.cancel)
        first_choice = run.absorb(src, first)
    except ClientDisconnected:
        metrics.finished(call.model, call.endpoint, "abort", 0, 0, time.perf_counter() - arrived)
        return _Gone()
    except StopAsyncIteration:
        raise APIError(500, "the engine ended the request without output", code="engine_error") from None
    except APIError:
        metrics.finished(call.model, call.endpoint, "error", 0, 0, time.perf_counter() - arrived)
        raise
    if first.text:
        metrics.ttft.observe(time.perf_counter() - arrived)
    rid, created = request_id(call.endpoint), int(time.time())

    if not call.stream:
        async def rest() -> None:
            async for s, out in merged:
                run.absorb(s, out)

        try:
            await until_disconnect(request, rest(), run.cancel)
        except ClientDisconnected:
            metrics.finished(call.model, call.endpoint, "abort", 0, 0, time.perf_counter() - arrived)
            return _Gone()
        except APIError:
            metrics.finished(call.model, call.endpoint, "error", 0, 0, time.perf_counter() - arrived)
            raise
        body = run.body(rid, created)
        use = body["usage"]
        metrics.finished(call.model, call.endpoint, run.finish_reason(), use["prompt_tokens"], use["completion_tokens"],
                         time.perf_counter() - arrived)
        return JSONResponse(body)

    events = _events(run, rid, created, first_choice, first, merged, arrived)
    return EventStreamResponse(events, on_close=run.cancel)


class _Gone(Response):
    """The answer to a client that already left: sends nothing (the socket is closed)."""

    def __init__(self) -> None:
        super().__init__(status_code=499)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        return None


async def _events(run: _Run, rid: str, created: int, first_choice: ChoiceState, first: Any,
                  rest: AsyncIterator[tuple[Source, Any]], arrived: float) -> AsyncIterator[str]:
    """SSE events: chunks per engine delta, the finish reasons, usage if asked, then ``[DONE]``."""
    call, metrics = run.call, run.state.metrics
    chat = call.endpoint == "chat"
    chunk = rs.chat_chunk if chat else rs.completion_chunk
    last_t, saw_text = time.perf_counter(), bool(first.text)
    finish: Optional[str] = None
    try:
        choice, out = first_choice, first
        while True:
            items = run.chunk_choices(choice, out)
            for item in items:
                yield sse(chunk(rid, created, call.model, [item], with_usage=call.include_usage))
            try:
                src, out = await rest.__anext__()
            except StopAsyncIteration:
                break
            now = time.perf_counter()
            if out.text:
                if saw_text:
                    metrics.itl.observe(now - last_t)
                else:
                    metrics.ttft.observe(now - arrived)
                saw_text, last_t = True, now
            try:
                choice = run.absorb(src, out)
            except APIError as exc:
                finish = "error"
                yield sse(exc.body())
                break
        if finish != "error":
            finish = run.finish_reason()
            if call.include_usage:
                yield sse(chunk(rid, created, call.model, [], with_usage=True, use=run.usage()))
        yield sse("[DONE]")
    except Exception:  # noqa: BLE001 - a fault of ours mid-stream: say so in the stream, keep the server up
        logger.exception("stream of %s failed", rid)
        finish = "error"
        yield sse(error_body(500, "the stream failed; the server log has the details", code="internal_error"))
        yield sse("[DONE]")
    finally:
        use = run.usage()
        metrics.finished(call.model, call.endpoint, finish or "abort", use["prompt_tokens"], use["completion_tokens"],
                         time.perf_counter() - arrived)
