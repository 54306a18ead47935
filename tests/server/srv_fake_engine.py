"""A small engine that follows the engine contract, for the server's error paths.

It uses the real ``RequestHandle``, ``SamplingParams``, ``RequestOutput``, failures and
``AdapterRegistry``, so the server code under test is exactly what runs against the real engine;
only the model is replaced by a deterministic text generator (``"<adapter>:<i> "`` per token, token
id ``i``, logprob ``-(i + 1) / 10``, alternatives ``(i + 1 + j, -(i + 2 + j) / 10)``). With ``n`` it
emits each sequence's deltas with ``index`` set. Knobs reproduce situations that are hard to force
on the real engine: a full queue, a failing adapter load, a request that never produces output, and
a ``gate`` that lets tokens out one permit at a time (disconnect tests without timing races).
"""
from __future__ import annotations

import itertools
import threading
from typing import Any

from loramux.cache import AdapterRegistry
from loramux.engine import EngineOverloaded, RequestHandle, RequestOutput, RequestRejected, SamplingParams
from loramux.engine.failures import Failure, FailureKind
from loramux.engine.logprobs import TokenLogprob
from loramux.errors import UnknownAdapterError


class Gate:
    """Token permits: ``allow(k)`` lets k more tokens out; a waiting producer also wakes on cancel."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._permits = 0

    def allow(self, k: int = 1) -> None:
        with self._cond:
            self._permits += k
            self._cond.notify_all()

    def take(self, cancel: threading.Event, timeout: float = 30.0) -> bool:
        """One permit (True), or False once ``cancel`` is set; ``timeout`` only guards a broken test."""
        with self._cond:
            ok = self._cond.wait_for(lambda: self._permits > 0 or cancel.is_set(), timeout)
            if not ok or cancel.is_set():
                return False
            self._permits -= 1
            return True

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()


def fake_logprob(i: int, k: int) -> TokenLogprob:
    return TokenLogprob(i, -(i + 1) / 10, tuple((i + 1 + j, -(i + 2 + j) / 10) for j in range(k)))


class FakeEngine:
    def __init__(self, registry: AdapterRegistry | None = None, tokenizer: Any = None, max_context: int = 64) -> None:
        self.registry = registry if registry is not None else AdapterRegistry()
        self.tokenizer = tokenizer
        self.max_context = max_context
        self.overloaded = False
        self.fail_adapters: dict[str, str] = {}  # adapter -> error text on its first output
        self.stall = False  # produce nothing until cancelled
        self.gate: Gate | None = None  # when set, every token waits for a permit
        self.cancelled: list[str] = []
        self.submitted: list[tuple[Any, str | None, SamplingParams]] = []
        self.produced = 0  # tokens pushed so far (all requests)
        self.running = 0
        self._ids = itertools.count()
        self._cond = threading.Condition()

    def stats(self) -> dict[str, Any]:
        return {"running": self.running, "waiting": 0, "resident_adapters": 0, "resident_bytes": 0, "loads": 0,
                "evictions": 0, "load_errors": len(self.fail_adapters), "hits": 0, "misses": 0, "load_seconds": 0.0,
                "generated_tokens": 0}

    def wait_for(self, predicate, timeout: float = 30.0) -> bool:
        """Block until ``predicate(self)`` holds (checked whenever the fake's state changes)."""
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self), timeout)

    def submit(self, prompt: Any, adapter: str | None = None, params: SamplingParams | None = None,
               *, request_id: str | None = None) -> RequestHandle:
        params = params or SamplingParams()
        if adapter is not None and adapter not in self.registry:
            raise UnknownAdapterError(f"adapter {adapter!r} is not known")
        if self.overloaded:
            raise EngineOverloaded("waiting queue is full (1024)")
        n_prompt = len(prompt) if isinstance(prompt, list) else len(prompt.split())
        if n_prompt + 1 > self.max_context:
            raise RequestRejected(f"prompt of {n_prompt} tokens cannot fit the context of {self.max_context} tokens")
        rid = request_id or f"fake-{next(self._ids)}"
        cancel = threading.Event()

        def canceller(_: str) -> None:
            with self._cond:
                self.cancelled.append(rid)
                cancel.set()
                self._cond.notify_all()
            if self.gate is not None:
                self.gate.wake()

        handle = RequestHandle(rid, adapter, n_prompt, canceller=canceller, n=getattr(params, "n", 1))
        with self._cond:
            self.submitted.append((prompt, adapter, params))
            self.running += 1
            self._cond.notify_all()
        threading.Thread(target=self._run, args=(handle, adapter, params, prompt, cancel), daemon=True).start()
        return handle

    def _push(self, handle: RequestHandle, out: RequestOutput) -> None:
        handle._push(out)
        with self._cond:
            self.produced += len(out.token_ids)
            self._cond.notify_all()

    def _run(self, handle: RequestHandle, adapter: str | None, params: SamplingParams, prompt: Any,
             cancel: threading.Event) -> None:
        rid, name = handle.request_id, adapter or "base"
        n_prompt = len(prompt) if isinstance(prompt, list) else len(prompt.split())
        n = getattr(params, "n", 1)
        k = getattr(params, "logprobs", None)
        pk = getattr(params, "prompt_logprobs", None)
        try:
            if adapter in self.fail_adapters:
                message = self.fail_adapters[adapter]
                for seq in range(n):
                    self._push(handle, RequestOutput(rid, adapter, [], "", True, "error", n_prompt, 0, message, index=seq,
                                                     failure=Failure(FailureKind.ADAPTER_LOAD_FAILED, message)))
                return
            if self.stall:
                cancel.wait(30)
                for seq in range(n):
                    self._push(handle, RequestOutput(rid, adapter, [], "", True, "abort", n_prompt, 0, index=seq))
                return
            prompt_lp = None
            if pk is not None and isinstance(prompt, list):
                prompt_lp = [None] + [fake_logprob(t, pk) for t in prompt[1:]]
            for i in range(params.max_tokens):
                for seq in range(n):
                    if cancel.is_set() or (self.gate is not None and not self.gate.take(cancel)):
                        self._push(handle, RequestOutput(rid, adapter, [], "", True, "abort", n_prompt, i, index=seq))
                        for other in range(seq + 1, n):
                            self._push(handle, RequestOutput(rid, adapter, [], "", True, "abort", n_prompt, i,
                                                             index=other))
                        return
                    last = i == params.max_tokens - 1
                    self._push(handle, RequestOutput(
                        rid, adapter, [i], f"{name}:{i} ", last, "length" if last else None, n_prompt, i + 1,
                        index=seq, logprobs=[fake_logprob(i, k)] if k is not None else None,
                        prompt_logprobs=prompt_lp if i == 0 else None))
        finally:
            with self._cond:
                self.running -= 1
                self._cond.notify_all()
