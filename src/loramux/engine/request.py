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
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any, AsyncIterator, Callable, Iterator, Mapping

from loramux.engine.failures import Failure
from loramux.engine.logprobs import TokenLogprob

FINISH_REASONS = ("stop", "length", "abort", "error")


class RequestRejected(ValueError):
    """The request can never be served as asked (prompt longer than the context, bad parameter)."""


class EngineOverloaded(RuntimeError):
    """The waiting queue is full (``max_waiting``); retry later (HTTP 503/429)."""


GREEDY_BELOW = 1e-5  # temperatures below this are greedy (as vLLM): dividing by them overflows
MAX_N = 16
MAX_LOGPROBS = 20
MAX_BIAS = 100.0


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop; validated here, so a bad value fails ``submit``.

    ``temperature`` below 1e-5 is greedy (argmax; ``top_p``/``top_k``/``seed`` are then ignored).
    ``top_k == 0`` and ``top_p == 1.0`` switch those filters off. ``seed`` makes sampling
    reproducible per request whatever else shares the batch (its own ``torch.Generator``); with
    ``n > 1`` sequence ``i`` uses ``seed + i``. ``stop`` strings end the output before the match
    (the match itself is not returned); ``stop_token_ids`` (and the tokenizer's EOS unless
    ``ignore_eos``) end it after that token, which is counted but not rendered as text.

    ``n``: sequences sampled from one prompt (prefilled once, its KV forked). ``logprobs`` /
    ``prompt_logprobs``: None = off, k = the token's logprob plus the top-k alternatives (raw
    model distribution, before bias/masks/temperature). ``logit_bias``: token id -> bias added to
    the logits (stored as a sorted tuple of pairs; ids are checked against the vocab at submit).
    ``constraint``: a factory of ``TokenConstraint`` (``loramux.engine.constraints``), one per sequence.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    n: int = 1
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    logit_bias: Any = ()  # Mapping[int, float] in, tuple[tuple[int, float], ...] stored
    constraint: Callable[[], Any] | None = None

    def __post_init__(self) -> None:
        # accept lists (JSON) and a single string for stop, store tuples so the object stays hashable
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        if not isinstance(self.stop, (tuple, list)):
            raise RequestRejected(f"stop must be a string or a list of strings, got {type(self.stop).__name__}")
        object.__setattr__(self, "stop", tuple(self.stop or ()))
        ids = tuple(self.stop_token_ids or ())
        if not all(_is_int(t) and t >= 0 for t in ids):
            raise RequestRejected(f"stop_token_ids must be non-negative integers, got {list(ids)!r}")
        object.__setattr__(self, "stop_token_ids", ids)
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise RequestRejected(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not _is_real(self.temperature) or self.temperature < 0:  # also refuses NaN, inf and strings
            raise RequestRejected(f"temperature must be a finite number >= 0 (below {GREEDY_BELOW} = greedy), "
                                  f"got {self.temperature!r}")
        if not _is_real(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise RequestRejected(f"top_p must be in (0, 1] (1 = off), got {self.top_p!r}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise RequestRejected(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not _is_int(self.n) or not 1 <= self.n <= MAX_N:
            raise RequestRejected(f"n must be an integer in 1..{MAX_N}, got {self.n!r}")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed <= 2**63 - MAX_N):
            raise RequestRejected(f"seed must be an integer in [0, 2**63 - {MAX_N}] or None, got {self.seed!r}")
        for field_name in ("logprobs", "prompt_logprobs"):
            k = getattr(self, field_name)
            if k is not None and (not _is_int(k) or not 0 <= k <= MAX_LOGPROBS):
                raise RequestRejected(f"{field_name} must be None (off) or an integer in 0..{MAX_LOGPROBS}, got {k!r}")
        object.__setattr__(self, "logit_bias", _bias_pairs(self.logit_bias))
        if self.constraint is not None and not callable(self.constraint):
            raise RequestRejected("constraint must be a callable that returns a TokenConstraint (one per sequence), "
                                  f"got {type(self.constraint).__name__}")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise RequestRejected(f"stop strings must be non-empty strings, got {s!r}")
        if len(self.stop) > 16:
            raise RequestRejected(f"at most 16 stop strings are allowed, got {len(self.stop)}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


def _bias_pairs(bias: Any) -> tuple[tuple[int, float], ...]:
    """``logit_bias`` as sorted (token_id, bias) pairs; keys may be ints or decimal strings (JSON)."""
    if bias is None:
        return ()
    items = bias.items() if isinstance(bias, Mapping) else bias
    try:
        items = list(items)
    except TypeError:
        raise RequestRejected(f"logit_bias must map token ids to biases, got {type(bias).__name__}") from None
    out: dict[int, float] = {}
    for item in items:
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise RequestRejected(f"logit_bias must map token ids to biases, got the entry {item!r}")
        key, value = item
        if isinstance(key, str) and key.strip().isdigit():
            key = int(key)
        if not _is_int(key) or key < 0:
            raise RequestRejected(f"logit_bias keys must be non-negative token ids, got {key!r}")
        if not _is_real(value) or not -MAX_BIAS <= value <= MAX_BIAS:
            raise RequestRejected(f"logit_bias[{key}] must be a number in [-{MAX_BIAS:g}, {MAX_BIAS:g}], got {value!r}")
        out[key] = float(value)
    return tuple(sorted(out.items()))


@dataclass(frozen=True)
class RequestOutput:
    """One delta from a running request, or (``finished``) its last one.

    From ``handle.result()`` the same record holds the whole output instead of a delta.
    ``completion_tokens`` and ``prompt_tokens`` are running totals in every record. ``index`` says
    which of the ``n`` sequences this is. ``logprobs``: one per token of this delta (when asked);
    ``prompt_logprobs``: the prompt's (first position None), in the first delta and the final result.
    ``failure`` says why a request did not finish normally (finish_reason ``error`` or ``abort``);
    ``error`` is its message when the finish reason is ``error``.
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
    index: int = 0
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None
    failure: Failure | None = None


_ids = itertools.count()


class RequestHandle:
    """The caller's end of one request: iterate it, ``await`` it, ``result()`` it, ``cancel()`` it.

    Thread-safe. Deltas are queued until read, so a slow reader loses nothing. Only one consumer
    should read the deltas (iterator or ``stream()``); ``result()`` may be called by anyone. With
    ``n > 1`` the deltas of all sequences come interleaved, each with its ``index``; a delta with
    ``finished=True`` ends that index, and iteration ends when every index has ended.
    """

    def __init__(self, request_id: str, adapter: str | None, prompt_tokens: int, canceller=None, n: int = 1) -> None:
        self.request_id = request_id
        self.adapter = adapter
        self.prompt_tokens = prompt_tokens
        self.n = n
        self._canceller = canceller
        self._lock = threading.Condition()
        self._deltas: deque[RequestOutput] = deque()
        self._tokens: list[list[int]] = [[] for _ in range(n)]
        self._text: list[list[str]] = [[] for _ in range(n)]
        self._logprobs: list[list[TokenLogprob] | None] = [None] * n
        self._prompt_logprobs: list[TokenLogprob | None] | None = None
        self._finals: list[RequestOutput | None] = [None] * n
        self._open = n  # sequences not finished yet
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self.submitted_at = time.monotonic()
        self.first_token_at: float | None = None
        self.token_times: list[float] = []  # monotonic time of each delta carrying tokens (latency metrics)

    # -- producer side (engine thread) -------------------------------------------------------
    def _push(self, out: RequestOutput) -> None:
        with self._lock:
            i = out.index
            if self._finals[i] is not None:
                return
            now = time.monotonic()
            if out.token_ids:
                if self.first_token_at is None:
                    self.first_token_at = now
                self.token_times.append(now)
            self._tokens[i].extend(out.token_ids)
            self._text[i].append(out.text)
            if out.logprobs is not None:
                self._logprobs[i] = (self._logprobs[i] or []) + list(out.logprobs)
            if out.prompt_logprobs is not None and self._prompt_logprobs is None:
                self._prompt_logprobs = list(out.prompt_logprobs)
            self._deltas.append(out)
            if out.finished:
                self._finals[i] = replace(out, token_ids=list(self._tokens[i]), text="".join(self._text[i]),
                                          logprobs=self._logprobs[i], prompt_logprobs=self._prompt_logprobs)
                self._open -= 1
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
        """True when every one of the ``n`` sequences has finished."""
        return self._open == 0

    def cancel(self) -> None:
        """Ask the engine to stop this request (all its sequences) at its next step (finish_reason ``abort``)."""
        if not self.finished and self._canceller is not None:
            self._canceller(self.request_id)

    def results(self, timeout: float | None = None) -> list[RequestOutput]:
        """Block until every sequence finished; their whole outputs, in ``index`` order."""
        with self._lock:
            if not self._lock.wait_for(lambda: self._open == 0, timeout):
                raise TimeoutError(f"request {self.request_id} not finished after {timeout} s")
            return list(self._finals)  # type: ignore[arg-type]

    def result(self, timeout: float | None = None) -> RequestOutput:
        """Block until finished; sequence 0's whole text and token ids, finish reason and usage counts."""
        return self.results(timeout)[0]

    def __iter__(self) -> Iterator[RequestOutput]:
        ended = 0
        while ended < self.n:
            with self._lock:
                self._lock.wait_for(lambda: bool(self._deltas))
                out = self._deltas.popleft()
            ended += out.finished
            yield out

    async def stream(self) -> AsyncIterator[RequestOutput]:
        """The deltas as an async iterator, usable from any event loop (no thread per stream)."""
        loop = asyncio.get_running_loop()
        event = asyncio.Event()
        with self._lock:
            self._waiters.append((loop, event))
        ended = 0
        try:
            while ended < self.n:
                with self._lock:
                    out = self._deltas.popleft() if self._deltas else None
                    if out is None:
                        event.clear()
                if out is None:
                    await event.wait()
                    continue
                ended += out.finished
                yield out
        finally:
            with self._lock:
                self._waiters.remove((loop, event))


@dataclass(eq=False)
class Request:
    """The engine's state for one request (touched by the engine thread only, after submit).

    Its prompt is prefilled once; then it has ``params.n`` ``Sequence`` rows in the decode batch.
    """

    request_id: str
    adapter: str | None  # None = the base model
    prompt_ids: list[int]
    params: SamplingParams
    handle: RequestHandle
    seq_reserved: int  # KV tokens one sequence may grow to: min(prompt + max_tokens, context limit)
    stop_ids: frozenset[int] = frozenset()
    arrival: int = field(default_factory=lambda: next(_ids))  # FCFS order
    prefilled: int = 0  # prompt tokens already in the KV cache (chunked prefill, or a prefix-cache hit)
    counted: bool = False  # cache hit/miss already counted for this request
    kv_part: object | None = None  # RowsKV of this request alone while its prompt is prefilled
    load: object | None = None  # the adapter's load (the model's AdapterInfo), pinned from admission to the end
    owner: object | None = None  # the prefix-cache owner (its load, or the base model's sentinel), set at admission
    cached_tokens: int = 0  # prompt tokens taken from the prefix cache
    prompt_logprobs: list | None = None  # filled during prefill when asked
    seqs: list["Sequence"] = field(default_factory=list)
    admitted: bool = False  # holds its place, KV reservation and adapter pin (until Scheduler.finish)
    done: bool = False

    @property
    def n(self) -> int:
        return self.params.n

    @property
    def kv_reserved(self) -> int:
        """KV tokens all ``n`` sequences may grow to (each holds its own copy of the prompt)."""
        return self.n * self.seq_reserved

    @property
    def max_new(self) -> int:
        return self.seq_reserved - len(self.prompt_ids)


@dataclass(eq=False)
class Sequence:
    """One of a request's ``n`` sequences: a row of the decode batch with its own sampling state."""

    req: Request
    index: int
    output_ids: list[int] = field(default_factory=list)
    generator: object | None = None  # torch.Generator for sampled rows, made at the first token
    detok: object | None = None  # IncrementalText
    constraint: object | None = None  # TokenConstraint, made by params.constraint()
    finished: bool = False
    sent_prompt_logprobs: bool = False

    @property
    def adapter(self) -> str | None:
        return self.req.adapter

    @property
    def load(self) -> object | None:
        return self.req.load

    @property
    def params(self) -> SamplingParams:
        return self.req.params

    @property
    def seed(self) -> int | None:
        seed = self.req.params.seed
        return None if seed is None else seed + self.index
