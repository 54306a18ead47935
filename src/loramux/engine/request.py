"""What a caller hands the engine and what it gets back.

``SamplingParams`` is validated once, at submit, so that a bad value fails the caller's call
(``RequestRejected``) instead of the step loop. ``RequestHandle`` is the caller's side of one
request: a thread-safe channel of ``RequestOutput`` deltas that can be read synchronously, from
any asyncio event loop, or all at once with ``result()``. ``Request`` is the engine's side: the
token state the step loop advances. Nothing here touches torch or the model.
"""
from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import AsyncIterator, Iterator

FINISH_REASONS = ("stop", "length", "abort", "error")


class RequestRejected(ValueError):
    """The request can never be served as asked (prompt longer than the context, bad parameter)."""


class EngineOverloaded(RuntimeError):
    """The waiting queue is full (``max_waiting``); retry later (HTTP 503/429)."""


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop.

    ``temperature == 0`` is greedy (argmax; ``top_p``/``top_k``/``seed`` are then ignored).
    ``top_k == 0`` and ``top_p == 1.0`` switch those filters off. ``seed`` makes sampling
    reproducible per request whatever else shares the batch (its own ``torch.Generator``).
    ``stop`` strings end the output before the match (the match itself is not returned);
    ``stop_token_ids`` (and the tokenizer's EOS unless ``ignore_eos``) end it after that token,
    which is counted but not rendered as text.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        # accept lists (JSON) and a single string for stop, store tuples so the object stays hashable
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop or ()))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in (self.stop_token_ids or ())))
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 1:
            raise RequestRejected(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not self.temperature >= 0.0:  # also refuses NaN
            raise RequestRejected(f"temperature must be >= 0 (0 = greedy), got {self.temperature!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise RequestRejected(f"top_p must be in (0, 1] (1 = off), got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise RequestRejected(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or self.seed < 0):
            raise RequestRejected(f"seed must be a non-negative integer or None, got {self.seed!r}")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise RequestRejected(f"stop strings must be non-empty strings, got {s!r}")
        if len(self.stop) > 16:
            raise RequestRejected(f"at most 16 stop strings are allowed, got {len(self.stop)}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class RequestOutput:
    """One delta from a running request, or (``finished``) its last one.

    From ``handle.result()`` the same record holds the whole output instead of a delta.
    ``completion_tokens`` and ``prompt_tokens`` are running totals in every record.
    """

    request_id: str
    adapter: str | None
    token_ids: list[int]
    text: str
    finished: bool = False
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None


_ids = itertools.count()


class RequestHandle:
    """The caller's end of one request: iterate it, ``await`` it, ``result()`` it, ``cancel()`` it.

    Thread-safe. Deltas are queued until read, so a slow reader loses nothing. Only one consumer
    should read the deltas (iterator or ``stream()``); ``result()`` may be called by anyone.
    """

    def __init__(self, request_id: str, adapter: str | None, prompt_tokens: int, canceller=None) -> None:
        self.request_id = request_id
        self.adapter = adapter
        self.prompt_tokens = prompt_tokens
        self._canceller = canceller
        self._lock = threading.Condition()
        self._deltas: deque[RequestOutput] = deque()
        self._tokens: list[int] = []
        self._text: list[str] = []
        self._final: RequestOutput | None = None
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self.submitted_at = time.monotonic()
        self.first_token_at: float | None = None
        self.token_times: list[float] = []  # monotonic time of each delta carrying tokens (latency metrics)

    # -- producer side (engine thread) -------------------------------------------------------
    def _push(self, out: RequestOutput) -> None:
        with self._lock:
            if self._final is not None:
                return
            now = time.monotonic()
            if out.token_ids:
                if self.first_token_at is None:
                    self.first_token_at = now
                self.token_times.append(now)
            self._tokens.extend(out.token_ids)
            self._text.append(out.text)
            self._deltas.append(out)
            if out.finished:
                self._final = replace(out, token_ids=list(self._tokens), text="".join(self._text))
            self._lock.notify_all()
            waiters = list(self._waiters)
        for loop, event in waiters:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # that loop is closed; its reader is gone
                pass

    # -- consumer side -----------------------------------------------------------------------
    @property
    def finished(self) -> bool:
        return self._final is not None

    def cancel(self) -> None:
        """Ask the engine to stop this request at its next step (finish_reason ``abort``)."""
        if self._final is None and self._canceller is not None:
            self._canceller(self.request_id)

    def result(self, timeout: float | None = None) -> RequestOutput:
        """Block until finished; the whole text and token ids, the finish reason and usage counts."""
        with self._lock:
            if not self._lock.wait_for(lambda: self._final is not None, timeout):
                raise TimeoutError(f"request {self.request_id} not finished after {timeout} s")
            return self._final  # type: ignore[return-value]

    def __iter__(self) -> Iterator[RequestOutput]:
        while True:
            with self._lock:
                self._lock.wait_for(lambda: bool(self._deltas))
                out = self._deltas.popleft()
            yield out
            if out.finished:
                return

    async def stream(self) -> AsyncIterator[RequestOutput]:
        """The deltas as an async iterator, usable from any event loop (no thread per stream)."""
        loop = asyncio.get_running_loop()
        event = asyncio.Event()
        with self._lock:
            self._waiters.append((loop, event))
        try:
            while True:
                with self._lock:
                    out = self._deltas.popleft() if self._deltas else None
                    if out is None:
                        event.clear()
                if out is None:
                    await event.wait()
                    continue
                yield out
                if out.finished:
                    return
        finally:
            with self._lock:
                self._waiters.remove((loop, event))


@dataclass(eq=False)
class Request:
    """The engine's state for one request (touched by the engine thread only, after submit)."""

    request_id: str
    adapter: str | None  # None = the base model
    prompt_ids: list[int]
    params: SamplingParams
    handle: RequestHandle
    kv_reserved: int  # KV tokens this request may grow to: min(prompt + max_tokens, context limit)
    stop_ids: frozenset[int] = frozenset()
    arrival: int = field(default_factory=lambda: next(_ids))  # FCFS order
    output_ids: list[int] = field(default_factory=list)
    prefilled: int = 0  # prompt tokens already in the KV cache (chunked prefill)
    cancelled: bool = False
    counted: bool = False  # cache hit/miss already counted for this request
    generator: object | None = None  # torch.Generator for seeded sampling, made lazily
    detok: object | None = None  # IncrementalText, made by the engine
    kv_part: object | None = None  # RowsKV of this request alone while its prompt is prefilled

    @property
    def max_new(self) -> int:
        return self.kv_reserved - len(self.prompt_ids)
