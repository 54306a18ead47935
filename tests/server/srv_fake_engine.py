"""A small engine that follows the engine contract, for the server's error paths.

It uses the real ``RequestHandle``, ``SamplingParams``, exceptions and ``AdapterRegistry``, so
the server code under test is exactly what runs against the real engine; only the model is
replaced by a deterministic text generator (``"<adapter>:<i> "`` per token). Knobs reproduce
situations that are hard to force on the real engine: a full queue, a failing adapter load, a
request that never produces output (to test disconnects).
"""
from __future__ import annotations

import itertools
import threading
import time
from typing import Any

from loramux.cache import AdapterRegistry
from loramux.engine import EngineOverloaded, RequestHandle, RequestOutput, RequestRejected, SamplingParams
from loramux.errors import UnknownAdapterError


class FakeEngine:
    def __init__(self, registry: AdapterRegistry | None = None, tokenizer: Any = None, max_context: int = 64,
                 delay: float = 0.0) -> None:
        self.registry = registry if registry is not None else AdapterRegistry()
        self.tokenizer = tokenizer
        self.max_context = max_context
        self.delay = delay
        self.overloaded = False
        self.fail_adapters: dict[str, str] = {}  # adapter -> error text on its first output
        self.stall = False  # produce nothing until cancelled
        self.cancelled: list[str] = []
        self.submitted: list[tuple[Any, str | None, SamplingParams]] = []
        self.running = 0
        self._ids = itertools.count()
        self._lock = threading.Lock()

    def stats(self) -> dict[str, Any]:
        return {"running": self.running, "waiting": 0, "resident_adapters": 0, "resident_bytes": 0, "loads": 0,
                "evictions": 0, "load_errors": len(self.fail_adapters), "hits": 0, "misses": 0, "load_seconds": 0.0,
                "generated_tokens": 0}

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
            self.cancelled.append(rid)
            cancel.set()

        handle = RequestHandle(rid, adapter, n_prompt, canceller=canceller)
        self.submitted.append((prompt, adapter, params))
        threading.Thread(target=self._run, args=(handle, adapter, params, n_prompt, cancel), daemon=True).start()
        return handle

    def _run(self, handle: RequestHandle, adapter: str | None, params: SamplingParams, n_prompt: int,
             cancel: threading.Event) -> None:
        with self._lock:
            self.running += 1
        try:
            rid, name = handle.request_id, adapter or "base"
            if adapter in self.fail_adapters:
                handle._push(RequestOutput(rid, adapter, [], "", True, "error", n_prompt, 0, self.fail_adapters[adapter]))
                return
            if self.stall:
                cancel.wait(30)
                handle._push(RequestOutput(rid, adapter, [], "", True, "abort", n_prompt, 0))
                return
            for i in range(params.max_tokens):
                if cancel.is_set():
                    handle._push(RequestOutput(rid, adapter, [], "", True, "abort", n_prompt, i))
                    return
                if self.delay:
                    time.sleep(self.delay)
                last = i == params.max_tokens - 1
                handle._push(RequestOutput(rid, adapter, [i], f"{name}:{i} ", last, "length" if last else None,
                                           n_prompt, i + 1))
        finally:
            with self._lock:
                self.running -= 1
