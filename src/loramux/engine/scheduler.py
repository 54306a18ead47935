"""Who runs next: admission under the running/KV limits, and adapter loads and rotation.

The rules, in the order they apply each step:

1. Requests wait in arrival order. A request whose adapter is resident is admitted (its adapter
   pinned) if its ``n`` rows and its KV reservation (n x (prompt + max new tokens)) fit. The first
   resident request that does *not* fit stops admission for this step: nobody overtakes it, so a
   large request cannot be starved by a stream of small ones (first come, first served).
2. A request whose adapter is not resident does not block the queue: it waits while its adapter
   loads in the background, and requests behind it with resident adapters go ahead.
3. Loads start in arrival order of the requests that want them, into free room or in place of
   unpinned adapters that no waiting request wants (least recently used first). The head (below)
   may also take the place of one that only requests queued behind it want, never of one that a
   request ahead of it waits for: that request is admitted first, and evicting its adapter only
   meant loading it again (measured: a third of the loads in the 2,000-adapter benchmark).
4. Rotation: if the oldest request waiting for an adapter (the *head*) cannot get room because
   every resident adapter is pinned by running requests, one of them (fewest pins, least recently
   used, preferably wanted by nobody waiting) is *drained*: no new request is admitted for it, its
   running requests finish, and it is evicted for the head's adapter. Only the head triggers
   this, and heads are served in arrival order, so every request gets its adapter in bounded time
   (no starvation) and each request causes at most one eviction (bounded thrash). This is the
   spirit of LoRAX's adapter exchange, at request granularity.
"""
from __future__ import annotations

import logging

from loramux.cache import AdapterCache
from loramux.engine.request import EngineOverloaded, Request
from loramux.errors import AdapterError

logger = logging.getLogger(__name__)


class Scheduler:
    """The waiting queue, the admitted set and the adapter policy; no model, no threads."""

    def __init__(self, cache: AdapterCache, *, max_running: int, max_kv_tokens: int, max_waiting: int) -> None:
        if max_running < 1:
            raise ValueError(f"max_running must be >= 1, got {max_running}")
        if max_kv_tokens < 2:
            raise ValueError(f"max_kv_tokens must be >= 2, got {max_kv_tokens}")
        if max_waiting < 1:
            raise ValueError(f"max_waiting must be >= 1, got {max_waiting}")
        self.cache = cache
        self.max_running, self.max_kv_tokens, self.max_waiting = max_running, max_kv_tokens, max_waiting
        self.waiting: list[Request] = []  # arrival order
        self.running: list[Request] = []  # admitted: prefilling or decoding
        self.kv_reserved = 0
        self.rows = 0  # decode rows the running requests use (n each)
        self.draining: set[str] = set()
        self._exchange_for: str | None = None

    def add(self, req: Request) -> None:
        if len(self.waiting) >= self.max_waiting:
            raise EngineOverloaded(f"{len(self.waiting)} requests are waiting (max_waiting={self.max_waiting}); retry later")
        self.waiting.append(req)

    def remove_waiting(self, req: Request) -> None:
        self.waiting.remove(req)

    def finish(self, req: Request) -> None:
        """A running request left (finished, cancelled, failed): free its slot, KV and pin."""
        self.running.remove(req)
        self.kv_reserved -= req.kv_reserved
        self.rows -= req.n
        self.cache.release(req.adapter)

    def schedule(self) -> tuple[list[Request], list[tuple[Request, BaseException]]]:
        """Admit what fits and start loads; returns (admitted requests, failed requests with their error)."""
        failed = self._take_failed_loads()
        admitted: list[Request] = []
        blocked = False
        for req in list(self.waiting):
            resident = self.cache.is_resident(req.adapter)
            if not req.counted:
                self.cache.record(resident)
                req.counted = True
            if not resident or req.adapter in self.draining or blocked:
                continue
            if self.rows + req.n > self.max_running or self.kv_reserved + req.kv_reserved > self.max_kv_tokens:
                blocked = True  # rule 1: nobody overtakes this one
                continue
            if not self.cache.acquire(req.adapter):  # unregistered a moment ago
                continue
            self.waiting.remove(req)
            self.running.append(req)
            self.kv_reserved += req.kv_reserved
            self.rows += req.n
            admitted.append(req)
        failed += self._start_loads()
        return admitted, failed

    def _take_failed_loads(self) -> list[tuple[Request, BaseException]]:
        failures = self.cache.take_failures()
        if not failures:
            return []
        failed = [(r, failures[r.adapter]) for r in self.waiting if r.adapter in failures]
        for req, _ in failed:
            self.waiting.remove(req)
        return failed

    def _start_loads(self) -> list[tuple[Request, BaseException]]:
        wanted: list[str] = []  # non-resident adapters, in arrival order of their first request
        protected: set[str] = set()  # resident adapters some waiting request wants
        ahead: set[str] = set()  # ... wanted by a request queued before the head's: never evicted for it
        for req in self.waiting:
            if req.adapter is None:
                continue
            if self.cache.is_resident(req.adapter):
                protected.add(req.adapter)
                if not wanted:
                    ahead.add(req.adapter)
            elif req.adapter not in wanted:
                wanted.append(req.adapter)
        head = wanted[0] if wanted else None
        if head != self._exchange_for:  # the head was served, cancelled or failed: stop draining for it
            self.draining.clear()
            self._exchange_for = None
        failed: list[tuple[Request, BaseException]] = []
        for name in wanted:
            try:
                status = self.cache.start_load(name, frozenset(protected), force=name == head, keep=frozenset(ahead))
            except AdapterError as exc:  # can never fit, or vanished from the registry
                failed += [(r, exc) for r in self.waiting if r.adapter == name]
                continue
            if status == "full" and name == head:
                self._drain_for(name, protected, ahead)
            elif status in ("loading", "resident", "stale") and name == head:
                self.draining.clear()
                self._exchange_for = None
            if status == "busy":  # the loader is saturated; later names would be refused too
                break
        for req, _ in failed:
            self.waiting.remove(req)
        return failed

    def _drain_for(self, name: str, protected: set[str], ahead: set[str]) -> None:
        """Rule 4: pick one more pinned adapter to drain, unless one already draining is still busy.
        Not one that a request queued ahead of the head waits for: it would wait behind the drain."""
        self._exchange_for = name
        if any(self.cache.pins(d) > 0 for d in self.draining):
            return
        candidates = [c for c in self.cache.drain_candidates() if c not in self.draining and c not in ahead]
        candidates.sort(key=lambda c: c in protected)  # stable: nobody-wants-it first, then fewest pins/LRU
        if candidates:
            self.draining.add(candidates[0])
            logger.debug("draining adapter %s to make room for %s", candidates[0], name)
