"""Continuous batching across adapters: requests, sampling, the scheduler, the step loop, KV rows.

Usage (the HTTP server and ``loramux generate --batch`` are built on exactly this)::

    from loramux.engine import Engine, SamplingParams, AdapterRegistry
    registry = AdapterRegistry()
    registry.register("sql", "/path/sql"); registry.add_root("/adapters")   # knowing costs nothing
    with Engine(model, tokenizer, registry=registry, max_running=16, max_kv_tokens=16384,
                max_loaded_adapters=32) as engine:               # starts the step-loop thread
        handle = engine.submit("SELECT", adapter="sql", params=SamplingParams(max_tokens=64, temperature=0))
        for delta in handle: ...                                # or: async for delta in handle.stream()
        final = handle.result()                                 # full text/token_ids, finish_reason, usage
        finals = handle.results()                               # with SamplingParams(n=3): one per sequence
        handle.cancel()
        engine.stats()

``submit`` raises ``UnknownAdapterError`` (from ``loramux.errors``; adapter neither registered nor
loaded), ``RequestRejected`` (a ``ValueError``: the prompt can never fit, or a bad parameter) and
``EngineOverloaded`` (the waiting queue is full). A request that fails later (its adapter cannot be
loaded, its own row faults, the shared forward fails) ends with finish_reason ``"error"`` and a typed
``failure`` (``Failure(kind: FailureKind, message)``); one request's fault never fails another.

``SamplingParams`` also takes ``n`` (the prompt prefilled once, its KV forked; sequence i seeded
``seed + i``), ``logprobs``/``prompt_logprobs`` (k alternatives from the raw log-softmax),
``logit_bias`` and ``constraint`` (a ``TokenConstraint`` factory, ``engine/constraints.py``). Prompt KV
is kept in a prefix cache (``Engine(prefix_cache_bytes=...)``, 0 = off) keyed by the adapter's load,
never its name; ``stats()`` counts ``prefix_cache_hit_tokens``, ``prefix_cache_bytes`` and
``prefix_cache_entries``.

Layout: ``engine.py`` (the thread-safe front: submit, stats, the loop), ``step.py`` (one step over the
engine thread's state), ``batch.py`` (the decode batch: rows, KV, prepared routing), ``scheduler.py``
and ``policy.py`` (admission; adapter policy as pure functions over a cache snapshot),
``prefix_cache.py``, ``sampling.py``, ``logprobs.py``, ``constraints.py``, ``failures.py``, ``kv.py``.
"""
from loramux.cache import AdapterCache, AdapterRegistry
from loramux.engine.constraints import TokenConstraint
from loramux.engine.engine import Engine
from loramux.engine.failures import Failure, FailureKind
from loramux.engine.logprobs import TokenLogprob
from loramux.engine.request import (
    EngineOverloaded,
    RequestHandle,
    RequestOutput,
    RequestRejected,
    SamplingParams,
)

__all__ = [
    "AdapterCache",
    "AdapterRegistry",
    "Engine",
    "EngineOverloaded",
    "Failure",
    "FailureKind",
    "RequestHandle",
    "RequestOutput",
    "RequestRejected",
    "SamplingParams",
    "TokenConstraint",
    "TokenLogprob",
]
