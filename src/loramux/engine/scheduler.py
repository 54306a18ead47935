"""Who runs next: admission under the running/KV limits, and adapter loads and rotation.

The scheduler holds the queues; the adapter rules are pure functions in ``policy.py`` over a
snapshot of the cache, and the cache carries them out (``begin_load``, ``acquire``, ``release``).

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
from loramux.engine import policy
from loramux.engine.policy import LoadStatus
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
        self.waiting: list[Request] = []  # arrival order; admitted ones are the stepper's (prefilling or decoding)
        self.admitted = 0  # requests admitted and not finished
        self.kv_reserved = 0  # their KV reservations
        self.rows = 0  # decode rows they use (n each)
        self.draining: set[str] = set()
        self._exchange_for: str | None = None

    def add(self, req: Request) -> None:
        if len(self.waiting) >= self.max_waiting:
            raise EngineOverloaded(f"{len(self.waiting)} requests are waiting (max_waiting={self.max_waiting}); retry later")
        self.waiting.append(req)

    def remove_waiting(self, req: Request) -> None:
        self.waiting.remove(req)

    def finish(self, req: Request) -> None:
        """An admitted request left (finished, cancelled, failed): free its place, KV and pin."""
        if not req.admitted:
            return
        req.admitted = False
        self.admitted -= 1
        self.kv_reserved -= req.kv_reserved
        self.rows -= req.n
        if req.load is not None:
            self.cache.release(req.load)

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
            if req.adapter is not None:
                req.load = self.cache.acquire(req.adapter)
                if req.load is None:  # unregistered a moment ago
                    continue
            self.waiting.remove(req)
            req.admitted = True
            self.admitted += 1
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
        """Rules 3 and 4: decisions by ``policy`` on a snapshot of the cache, carried out by the cache."""
        view = self.cache.snapshot()
        wanted, protected, ahead = policy.demand((r.adapter for r in self.waiting), view)
        head = wanted[0] if wanted else None
        if head != self._exchange_for:  # the head was served, cancelled or failed: stop draining for it
            self.draining.clear()
            self._exchange_for = None
        failed: list[tuple[Request, BaseException]] = []
        for name in wanted:
            path, need = None, 0  # loading already: the decision reads its record, no header to parse each step
            if view.get(name) is None:
                try:
                    path, need = self.cache.estimate(name)
                except AdapterError as exc:  # vanished from the registry
                    failed += [(r, exc) for r in self.waiting if r.adapter == name]
                    continue
            decision = policy.load_decision(view, name, need, protected, force=name == head, keep=ahead)
            status = decision.status
            if status in (LoadStatus.TOO_BIG, LoadStatus.NEVER_FITS):
                failed += [(r, AdapterError(decision.reason)) for r in self.waiting if r.adapter == name]
                continue
            if status is LoadStatus.START:
                status = LoadStatus.LOADING if self.cache.begin_load(name, path, need, decision.victims) else LoadStatus.BUSY
                view = self.cache.snapshot()
            if status is LoadStatus.FULL and name == head:
                self._drain_for(name, view, protected, ahead)
            elif status in (LoadStatus.LOADING, LoadStatus.RESIDENT) and name == head:
                self.draining.clear()
                self._exchange_for = None
            if status is LoadStatus.BUSY:  # the loader is saturated; later names would be refused too
                break
        for req, _ in failed:
            self.waiting.remove(req)
        return failed

    def _drain_for(self, name: str, view, protected: set[str], ahead: set[str]) -> None:
        """Rule 4: drain one more pinned adapter (``policy.drain_choice``) for the head's ``name``."""
        self._exchange_for = name
        choice = policy.drain_choice(view, self.draining, ahead, protected)
        if choice is not None:
            self.draining.add(choice)
            logger.debug("draining adapter %s to make room for %s", choice, name)
