"""The engine: a thread running the step loop over one MultiLoraModel, fed by ``submit``.

One step (``Engine.step``):

1. take new submissions and cancellations from the inbox (the only state shared with callers);
2. the scheduler admits what fits and starts adapter loads (``scheduler.py``);
3. prefill newcomers, at most ``prefill_chunk`` prompt tokens this step (a long prompt is cut
   into chunks over several steps), so running decodes never wait for more than one chunk;
   a request whose prompt is done samples its first token and joins the running batch;
4. one decode forward for every running row, whatever its adapter (``adapter_names`` per row);
   sample; stream deltas; finished rows leave the KV cache at once.

Decode rows stay grouped by adapter (contiguous blocks): the core's grouped LoRA path then works
on slices, not gathers. Keeping them so costs one KV row copy per block when a sequence joins or
leaves, never a copy of the whole cache (``kv.py``).
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
from loramux.engine import grouped_rows
from loramux.engine import kv as kvops
from loramux.engine.detokenize import IncrementalText
from loramux.engine.failures import Failure, FailureKind, describe
from loramux.openmp import release_thread_pool
from loramux.engine.request import (EngineOverloaded, Request, RequestHandle, RequestOutput, RequestRejected,
                                    SamplingParams)
from loramux.engine.sampling import make_generator, sample_next
from loramux.engine.scheduler import Scheduler
from loramux.errors import UnknownAdapterError
from loramux.model import BASE_ADAPTER

logger = logging.getLogger(__name__)
_counter = itertools.count(1)
_ABORTED = Failure(FailureKind.ABORTED, "cancelled before it finished")


class Engine:
    """Continuous batching over one ``MultiLoraModel``; see the package docstring for the API.

    Limits: ``max_running`` sequences in the batch; ``max_kv_tokens`` KV tokens reserved by them
    (each reserves prompt + max new tokens when admitted, so a running request never runs out);
    ``max_waiting`` queued requests; ``max_context`` tokens per sequence (default: the model's
    ``max_position_embeddings``). Adapters: ``max_loaded_adapters`` / ``max_adapter_bytes``
    resident, loaded from ``registry`` on first use (see ``loramux.cache``).
    """

    def __init__(self, model: Any, tokenizer: Any = None, *, registry: AdapterRegistry | None = None,
                 max_running: int = 16, max_kv_tokens: int = 16384, max_loaded_adapters: int | None = 32,
                 max_adapter_bytes: int | None = None, max_waiting: int = 1024, prefill_chunk: int = 256,
                 max_context: int | None = None, host_cache_bytes: int | None = None) -> None:
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
        self._prefilling: list[Request] = []  # admitted, prompt not fully in the KV cache yet
        self._rows: list[Request] = []  # the decode batch, row order = self._kv row order
        self._kv: kvops.RowsKV | None = None
        self._thread: threading.Thread | None = None
        self._closed = False
        self._stop = False
        self.counters = {"generated_tokens": 0, "prompt_tokens": 0, "steps": 0, "finished": 0,
                         "prefill_seconds": 0.0, "decode_seconds": 0.0}

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
        return bool(self._inbox or self._cancels or self.scheduler.waiting or self.scheduler.running)

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
        stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else self._eos)
        with self._wake:
            if self._closed:
                raise EngineOverloaded("the engine is shutting down and accepts no new requests")
            if len(self._inbox) + len(self.scheduler.waiting) >= self.scheduler.max_waiting:
                raise EngineOverloaded(f"{self.scheduler.max_waiting} requests are already waiting (max_waiting); retry later")
            rid = request_id or f"req-{next(_counter)}"
            if rid in self._handles:
                raise RequestRejected(f"request_id {rid!r} is already in use")
            handle = RequestHandle(rid, adapter, len(ids), canceller=self._cancel)
            req = Request(rid, adapter, ids, params, handle, kv_reserved=min(len(ids) + params.max_tokens, limit),
                          stop_ids=frozenset(stop_ids))
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
        kv = self._kv
        return {**self.cache.stats(), **self.counters, "running": len(self.scheduler.running), "waiting": waiting,
                "kv_tokens_reserved": self.scheduler.kv_reserved, "kv_bytes": kv.nbytes() if kv is not None else 0}

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

        Any error inside fails the requests it concerns (all running ones, for a model error) and
        leaves the engine serving; KV buffers are inference tensors, so everything runs in that mode.
        """
        with torch.inference_mode():
            try:
                return self._step()
            except Exception as exc:  # noqa: BLE001 - never let one bad step kill the loop
                logger.exception("engine step failed; failing its %d running requests", len(self.scheduler.running))
                for req in list(self.scheduler.running):
                    self._finish(req, "error", failure=Failure(FailureKind.MODEL_ERROR, describe(exc)))
                self._prefilling, self._rows, self._kv = [], [], None
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
            self._finish(req, "error", failure=Failure(kind, describe(exc)), running=False)
        self._prefilling.extend(admitted)
        if not self._prefilling and not self._rows:
            return False
        self.counters["steps"] += 1
        t0 = time.perf_counter()
        joined = self._prefill()
        self._join(joined)
        t1 = time.perf_counter()
        self._decode()
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
                self._finish(req, "abort", failure=_ABORTED, running=False)
            elif req in self._prefilling:
                self._prefilling.remove(req)
                req.kv_part = None
                self._finish(req, "abort", failure=_ABORTED)
            elif req in self._rows:
                self._finish(req, "abort", failure=_ABORTED)
                self._drop_rows([req])

    def _forward(self, kv: kvops.RowsKV, input_ids: torch.Tensor, position_ids: torch.Tensor,
                 adapters: list[str | None]) -> torch.Tensor:
        """One forward through the model; returns the last position's logits (B, V).

        input_ids, position_ids: (B, T); the cache mask grows by T columns first.
        """
        mask = kv.extend_mask(input_ids.shape[1], input_ids.device)  # (B, L + T)
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, past_key_values=kv,
                         use_cache=True, adapter_names=[a or BASE_ADAPTER for a in adapters], logits_to_keep=1)
        return out.logits[:, -1, :]  # (B, 1, V) -> (B, V)

    def _prefill(self) -> list[Request]:
        """Feed at most ``prefill_chunk`` prompt tokens (more when no decode waits); return finished prompts."""
        budget = self.prefill_chunk if self._rows else 4 * self.prefill_chunk
        device = self.model.device
        done: list[Request] = []
        while budget > 0 and self._prefilling:
            req = self._prefilling[0]
            if req.kv_part is None:
                req.kv_part = kvops.RowsKV()
                req.kv_part.begin(1)
            n = min(budget, len(req.prompt_ids) - req.prefilled)
            chunk = torch.tensor([req.prompt_ids[req.prefilled: req.prefilled + n]], device=device)  # (1, n)
            pos = torch.arange(req.prefilled, req.prefilled + n, device=device).unsqueeze(0)  # (1, n)
            logits = self._forward(req.kv_part, chunk, pos, [req.adapter])
            req.prefilled += n
            budget -= n
            self.counters["prompt_tokens"] += n
            if req.prefilled == len(req.prompt_ids):
                self._prefilling.pop(0)
                if self._advance([req], logits):
                    done.append(req)
        return done

    def _join(self, joined: list[Request]) -> None:
        """Add freshly prefilled requests to the decode batch, each next to the rows of its adapter."""
        for req in joined:
            if self._kv is None:
                self._kv = kvops.RowsKV()
            grouped_rows.append(self._rows, self._kv, req)

    def _decode(self) -> None:
        if not self._rows:
            return
        device = self.model.device
        last = torch.tensor([[r.output_ids[-1]] for r in self._rows], device=device)  # (B, 1)
        pos = torch.tensor([[n] for n in self._kv.lengths], device=device)  # (B, 1): real tokens so far
        logits = self._forward(self._kv, last, pos, [r.adapter for r in self._rows])
        keep = self._advance(self._rows, logits, many=True)
        self._drop_rows([r for r, k in zip(self._rows, keep) if not k])

    def _advance(self, rows: list[Request], logits: torch.Tensor, many: bool = False):
        """Sample one token per row, stream it, finish rows that are done.

        Returns, with ``many``, one bool per row (still running); else whether the single row runs on.
        """
        for r in rows:
            if r.generator is None and not r.params.greedy:
                r.generator = make_generator(r.params.seed, logits.device)
        tokens = sample_next(logits, [r.params for r in rows], [r.generator for r in rows])
        keep = []
        for req, token in zip(rows, tokens):
            req.output_ids.append(token)
            self.counters["generated_tokens"] += 1
            if req.detok is None:
                req.detok = IncrementalText(self.tokenizer, req.params.stop)
            text = req.detok.update(req.output_ids)
            reason = None
            if token in req.stop_ids or req.detok.stopped:
                reason = "stop"
            elif len(req.output_ids) >= req.max_new:
                reason = "length"
            if reason is None:
                req.handle._push(self._output(req, [token], text))
                keep.append(True)
            else:
                self._finish(req, reason, token_ids=[token], text=text)
                keep.append(False)
        return keep if many else keep[0]

    def _drop_rows(self, gone: list[Request]) -> None:
        """Remove finished rows from the decode batch (``grouped_rows.remove``); free the cache when empty."""
        if not gone or self._kv is None:
            return
        grouped_rows.remove(self._rows, self._kv, gone)
        if not self._rows:
            self._kv = None

    def _output(self, req: Request, token_ids: list[int], text: str, reason: str | None = None,
                failure: Failure | None = None) -> RequestOutput:
        return RequestOutput(req.request_id, req.adapter, token_ids, text, finished=reason is not None,
                             finish_reason=reason, prompt_tokens=len(req.prompt_ids),
                             completion_tokens=len(req.output_ids),
                             error=failure.message if failure is not None and reason == "error" else None,
                             failure=failure)

    def _finish(self, req: Request, reason: str, *, token_ids: list[int] | None = None, text: str = "",
                failure: Failure | None = None, running: bool = True) -> None:
        if running and req in self.scheduler.running:
            self.scheduler.finish(req)
        if req.detok is not None and not req.detok.stopped:
            text += req.detok.flush()
        with self._wake:
            self._handles.pop(req.request_id, None)
        self.counters["finished"] += 1
        req.handle._push(self._output(req, token_ids or [], text, reason, failure))

