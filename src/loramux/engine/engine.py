"""The engine: a thread running the step loop over one MultiLoraModel, fed by ``submit``.

One step (``Engine.step``):

1. take new submissions and cancellations from the inbox (the only state shared with callers);
2. the scheduler admits what fits and starts adapter loads (``scheduler.py``);
3. the stepper (``step.py``) prefills newcomers (prefix cache first, then chunks) and runs one decode
   forward for every row of the decode batch (``batch.py``), whatever its adapter.

Everything after the inbox belongs to the engine thread alone. A fault is confined to what it
concerns: a row's own work fails that request, a shared forward fails the requests in it, and an
unexpected error in the step fails the requests held at that moment; the loop keeps serving.
"""
from __future__ import annotations

import itertools
import logging
import threading
import time
from typing import Any, Sequence

import torch

from loramux import cpu_kernel
from loramux.cache import AdapterCache, AdapterRegistry
from loramux.engine import kv as kvops
from loramux.engine.failures import Failure, FailureKind, describe
from loramux.engine.prefix_cache import PrefixCache
from loramux.engine.request import (EngineOverloaded, Request, RequestHandle, RequestOutput, RequestRejected,
                                    SamplingParams, Sequence as Seq)
from loramux.engine.scheduler import Scheduler
from loramux.engine.step import ABORTED, Stepper
from loramux.openmp import release_thread_pool
from loramux.errors import UnknownAdapterError
from loramux.model import BASE_ADAPTER

logger = logging.getLogger(__name__)
_counter = itertools.count(1)


class Engine:
    """Continuous batching over one ``MultiLoraModel``; see the package docstring for the API.

    Limits: ``max_running`` sequences in the batch; ``max_kv_tokens`` KV tokens reserved by them
    (each reserves prompt + max new tokens when admitted, so a running request never runs out);
    ``max_waiting`` queued requests; ``max_context`` tokens per sequence (default: the model's
    ``max_position_embeddings``). Adapters: ``max_loaded_adapters`` / ``max_adapter_bytes``
    resident, loaded from ``registry`` on first use (see ``loramux.cache``). ``prefix_cache_bytes``:
    prompt KV kept for reuse by later requests with the same adapter load and leading tokens (0 = off).
    """

    def __init__(self, model: Any, tokenizer: Any = None, *, registry: AdapterRegistry | None = None,
                 max_running: int = 16, max_kv_tokens: int = 16384, max_loaded_adapters: int | None = 32,
                 max_adapter_bytes: int | None = None, max_waiting: int = 1024, prefill_chunk: int = 256,
                 max_context: int | None = None, host_cache_bytes: int | None = None,
                 prefix_cache_bytes: int = 256 * 2**20) -> None:
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1 token, got {prefill_chunk}")
        self.model, self.tokenizer = model, tokenizer
        self.prefill_chunk = prefill_chunk
        config = model.config
        self.max_context = max_context or getattr(config, "max_position_embeddings", None) or 2048
        self.max_kv_tokens = max_kv_tokens
        self._wake = threading.Condition()
        self.cache = AdapterCache(model, registry, max_loaded=max_loaded_adapters, max_bytes=max_adapter_bytes,
                                  host_bytes=host_cache_bytes, on_change=self._notify)
        self.registry = self.cache.registry
        self.scheduler = Scheduler(self.cache, max_running=max_running, max_kv_tokens=max_kv_tokens,
                                   max_waiting=max_waiting)
        self._eos = self._eos_ids(tokenizer, model)
        self._vocab = getattr(config, "vocab_size", None)
        self._inbox: list[Request] = []
        self._cancels: set[str] = set()
        self._handles: dict[str, Request] = {}  # live requests by id (engine thread + submit under _wake)
        self.prefix_cache = PrefixCache(prefix_cache_bytes)
        self._base_owner: object = object()  # prefix-cache owner of the plain base model
        self._merged_seen: Any = None
        self._thread: threading.Thread | None = None
        self._closed = False
        self._stop = False
        self.counters = {"generated_tokens": 0, "prompt_tokens": 0, "steps": 0, "finished": 0,
                         "prefill_seconds": 0.0, "decode_seconds": 0.0}
        self._stepper = Stepper(scheduler=self.scheduler, tokenizer=tokenizer, device=model.device,
                                forward=self._forward, prepare=self._prepare, owner=self._owner, retire=self._retire,
                                prefix_cache=self.prefix_cache, prefill_chunk=prefill_chunk, counters=self.counters)

    @property
    def batch(self):
        """The decode batch (``batch.DecodeBatch``): rows, their KV and routing. Engine thread only."""
        return self._stepper.batch

    def running_requests(self) -> list[Request]:
        """The admitted requests, prefilling or decoding (introspection; engine thread only)."""
        return self._stepper.requests()

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "Engine":
        """Run the step loop on a background thread (idempotent).

        The calling thread's idle OpenMP workers are released first, so that the engine thread's
        pool is the only one (see ``loramux/openmp.py``: two pools made every small matmul 2-3x slower).
        On the CPU the grouped-LoRA kernel is loaded here (compiled if this machine has never built
        it, ~40 s once), not in the middle of the first request's first decode step.
        """
        if self._thread is None:
            if getattr(self.model.device, "type", "cpu") == "cpu":
                cpu_kernel.load()
            release_thread_pool()
            self._thread = threading.Thread(target=self._loop, name="loramux-engine", daemon=True)
            self._thread.start()
        return self

    def __enter__(self) -> "Engine":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.shutdown(abort=exc[0] is not None)

    def shutdown(self, abort: bool = False, timeout: float | None = None) -> None:
        """Stop accepting; finish (or with ``abort`` cancel) every request; stop the thread."""
        with self._wake:
            self._closed = True
            if abort:
                self._cancels.update(self._handles)
            self._wake.notify_all()
        if self._thread is not None:
            deadline = None if timeout is None else time.monotonic() + timeout
            while self._thread.is_alive() and self._has_work():
                with self._wake:
                    self._wake.wait(0.05)
                if deadline is not None and time.monotonic() > deadline:
                    break
            with self._wake:
                self._stop = True
                self._wake.notify_all()
            self._thread.join(timeout)
        else:  # never started: run what is queued here, so no handle is left waiting forever
            while self._has_work():
                if not self.step():
                    time.sleep(0.005)
        self.cache.close()

    def _notify(self) -> None:
        with self._wake:
            self._wake.notify_all()

    def _has_work(self) -> bool:
        return bool(self._inbox or self._cancels or self.scheduler.waiting or self.scheduler.admitted)

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._stop and not self._has_work():
                    self._wake.wait()
                if self._stop:
                    return
            if not self.step():  # waiting only on loads: do not spin
                with self._wake:
                    self._wake.wait(0.01)

    # ------------------------------------------------------------------ submitting
    def submit(self, prompt: str | Sequence[int], adapter: str | None = None, params: SamplingParams | None = None,
               *, request_id: str | None = None) -> RequestHandle:
        """Queue one request; thread-safe. See the package docstring for what it raises."""
        params = params if params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise RequestRejected(f"params must be a SamplingParams, got {type(params).__name__}")
        adapter = None if adapter in (None, "", BASE_ADAPTER) else adapter
        if adapter is not None and not self.cache.is_resident(adapter) and adapter not in self.registry:
            raise UnknownAdapterError(f"adapter {adapter!r} is neither registered nor loaded; "
                                      f"known: {len(self.registry.names())} registered, loaded: {sorted(self.cache.resident())}")
        ids = self._encode(prompt)
        limit = min(self.max_context, self.max_kv_tokens)
        if len(ids) >= limit:
            raise RequestRejected(f"the prompt has {len(ids)} tokens but at most {limit - 1} fit (the context holds "
                                  f"{self.max_context} tokens, max_kv_tokens is {self.max_kv_tokens}, and one is needed "
                                  "for the answer); shorten the prompt")
        if self._vocab is not None:
            bad = [t for t, _ in params.logit_bias if t >= self._vocab] + [t for t in params.stop_token_ids if t >= self._vocab]
            if bad:
                raise RequestRejected(f"logit_bias/stop_token_ids name token ids {bad[:5]} but this model's vocab has "
                                      f"{self._vocab} tokens (ids 0..{self._vocab - 1})")
        seq_reserved = min(len(ids) + params.max_tokens, limit)
        if params.n > self.scheduler.max_running or params.n * seq_reserved > self.max_kv_tokens:
            raise RequestRejected(f"n={params.n} sequences of up to {seq_reserved} tokens each need {params.n} of "
                                  f"max_running={self.scheduler.max_running} rows and {params.n * seq_reserved} of "
                                  f"max_kv_tokens={self.max_kv_tokens}; lower n or max_tokens")
        stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else self._eos)
        with self._wake:
            if self._closed:
                raise EngineOverloaded("the engine is shutting down and accepts no new requests")
            if len(self._inbox) + len(self.scheduler.waiting) >= self.scheduler.max_waiting:
                raise EngineOverloaded(f"{self.scheduler.max_waiting} requests are already waiting (max_waiting); retry later")
            rid = request_id or f"req-{next(_counter)}"
            if rid in self._handles:
                raise RequestRejected(f"request_id {rid!r} is already in use")
            handle = RequestHandle(rid, adapter, len(ids), canceller=self._cancel, n=params.n)
            req = Request(rid, adapter, ids, params, handle, seq_reserved=seq_reserved, stop_ids=frozenset(stop_ids))
            req.seqs = [Seq(req, i) for i in range(params.n)]
            self._handles[rid] = req
            self._inbox.append(req)
            self._wake.notify_all()
        return handle

    def _encode(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestRejected("a text prompt needs a tokenizer; pass token ids or Engine(model, tokenizer)")
            ids = list(self.tokenizer(prompt)["input_ids"])
        else:
            ids = [int(t) for t in prompt]
        if not ids:
            raise RequestRejected("the prompt is empty; send at least one token")
        if self._vocab is not None and not all(0 <= t < self._vocab for t in ids):
            raise RequestRejected(f"prompt token ids must be in [0, {self._vocab}) for this model")
        return ids

    def _cancel(self, request_id: str) -> None:
        with self._wake:
            if request_id in self._handles:
                self._cancels.add(request_id)
                self._wake.notify_all()

    def generate(self, prompts: Sequence[str | Sequence[int]], adapters: Sequence[str | None] | None = None,
                 params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[RequestOutput]:
        """Submit all, wait for all (runs the loop here if the engine thread is not started)."""
        adapters = list(adapters) if adapters is not None else [None] * len(prompts)
        plist = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        handles = [self.submit(p, a, sp) for p, a, sp in zip(prompts, adapters, plist)]
        if self._thread is None:
            while not all(h.finished for h in handles):
                if not self.step():
                    time.sleep(0.005)
        return [h.result() for h in handles]

    def stats(self) -> dict[str, Any]:
        """Counters for metrics: adapter cache, queue, batch and token totals."""
        with self._wake:
            waiting = len(self.scheduler.waiting) + len(self._inbox)
        return {**self.cache.stats(), **self.counters, **self.prefix_cache.stats(), "running": self.scheduler.admitted,
                "running_sequences": self.scheduler.rows, "waiting": waiting,
                "kv_tokens_reserved": self.scheduler.kv_reserved, "kv_bytes": self.batch.nbytes()}

    @staticmethod
    def _eos_ids(tokenizer: Any, model: Any) -> set[int]:
        ids: set[int] = set()
        for source in (getattr(model, "generation_config", None), tokenizer):
            eos = getattr(source, "eos_token_id", None)
            if isinstance(eos, int):
                ids.add(eos)
            elif isinstance(eos, (list, tuple)):
                ids.update(int(e) for e in eos)
        return ids

    # ------------------------------------------------------------------ the step
    def step(self) -> bool:
        """One iteration; returns False when nothing could run (only waiting on loads, or idle).

        KV buffers are inference tensors, so everything runs in that mode. The stepper confines the
        faults it expects; anything else (a bug in the bookkeeping) fails the requests held at that
        moment and leaves the engine serving.
        """
        with torch.inference_mode():
            try:
                return self._step()
            except Exception as exc:  # noqa: BLE001 - never let one bad step kill the loop
                logger.exception("engine step failed; failing the requests it held")
                failure = Failure(FailureKind.MODEL_ERROR, describe(exc))
                self._stepper.fail_everything(failure)
                for req in list(self._handles.values()):  # admitted but not yet handed to the stepper
                    if req.admitted:
                        self._stepper.end(req, "error", failure)
                return True

    def _step(self) -> bool:
        with self._wake:
            new, self._inbox = self._inbox, []
            cancels, self._cancels = self._cancels, set()
        for req in new:
            self.scheduler.add(req)  # submit bounded the queue already
        self._apply_cancels(cancels)
        admitted, failed = self.scheduler.schedule()
        for req, exc in failed:
            kind = FailureKind.UNKNOWN_ADAPTER if isinstance(exc, UnknownAdapterError) else FailureKind.ADAPTER_LOAD_FAILED
            self._stepper.end(req, "error", Failure(kind, describe(exc)))
        for req in admitted:
            self._stepper.admit(req)
        if not self._stepper.has_work():
            return False
        self.counters["steps"] += 1
        t0 = time.perf_counter()
        self._stepper.prefill()
        t1 = time.perf_counter()
        self._stepper.decode()
        self.counters["prefill_seconds"] += t1 - t0
        self.counters["decode_seconds"] += time.perf_counter() - t1
        return True

    def _apply_cancels(self, cancels: set[str]) -> None:
        for rid in cancels:
            req = self._handles.get(rid)
            if req is None:
                continue
            if req in self.scheduler.waiting:
                self.scheduler.remove_waiting(req)
                self._stepper.end(req, "abort", ABORTED)
            else:
                self._stepper.cancel(req)

    def _retire(self, req: Request) -> None:
        """Every sequence of ``req`` has ended: free its place, KV reservation and adapter pin."""
        self.scheduler.finish(req)
        with self._wake:
            self._handles.pop(req.request_id, None)
        self.counters["finished"] += 1

    def _prepare(self, loads: list[Any]) -> Any:
        """The routing of a forward over rows with these adapter loads (the requests' pinned
        ``AdapterInfo`` objects; None = base, the engine's only base sentinel): slots resolved once
        (``MultiLoraModel.prepare_routing``) when the decode batch changes, not in every step, and
        used by the model without pinning again (the requests hold the pins)."""
        return self.model.prepare_routing(loads)

    def _owner(self, req: Request) -> Any:
        """The prefix-cache owner of ``req``'s adapter load: the model's ``AdapterInfo`` object (a new
        one on every load or reload), or the base model's sentinel; None = do not cache."""
        if not self.prefix_cache.enabled:
            return None
        merged = getattr(self.model, "merged_adapter", None)
        if merged != self._merged_seen:  # merging changed W0: base KV computed before is stale
            self._merged_seen, self._base_owner = merged, object()
        if merged is not None:
            return None
        return self._base_owner if req.load is None else req.load

    def _forward(self, kv: kvops.RowsKV, input_ids: torch.Tensor, position_ids: torch.Tensor, routing: Any,
                 all_logits: bool = False) -> torch.Tensor:
        """One forward through the model: the last position's logits (B, V), or with ``all_logits`` every
        position's (B, T, V). input_ids, position_ids: (B, T); the cache mask grows by T columns first."""
        mask = kv.extend_mask(input_ids.shape[1], input_ids.device)  # (B, L + T)
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, past_key_values=kv,
                         use_cache=True, adapter_names=routing, logits_to_keep=0 if all_logits else 1)
        return out.logits if all_logits else out.logits[:, -1, :]  # (B, 1, V) -> (B, V)
