"""``EngineReplica``: one Ray Serve replica holding the base model, an ``Engine`` and its own adapter cache.

The engine batches every adapter together inside the replica (``@serve.batch`` is not used: it
splits batches by multiplexed model id). Each request names its adapter by an *internal key* and
carries the adapter's directory, so an adapter loaded at runtime through the ingress is resolved
here lazily, on first use, without a broadcast to every replica. The key is ``name`` or, after a
runtime reload/unload of that name, ``name#vN`` (the ingress bumps N on every change), so a replica
that still holds the old weights can never serve them under the new name.

``@serve.multiplexed`` is used only for its report: the loader records the key (nothing is loaded
by it; the engine loads on first use) and Ray tells every router which keys this replica holds.
Its LRU capacity is the engine cache's, so both forget adapters in the same order.
"""
from __future__ import annotations

import asyncio
import logging
import os
import socket
from typing import Any, AsyncIterator

from .messages import Accepted, Refused, ReplicaStats

logger = logging.getLogger(__name__)


def engine_args(options: dict[str, Any]) -> Any:
    """``loramux serve``'s argparse defaults overridden by ``options`` (flag names with underscores)."""
    import argparse

    from ..server.command import add_arguments

    parser = argparse.ArgumentParser(add_help=False)
    add_arguments(parser)
    args = parser.parse_args([])
    unknown = sorted(set(options) - set(vars(args)))
    if unknown:
        raise ValueError(f"unknown loramux serve options {unknown}; valid: {sorted(vars(args))}")
    for key, value in options.items():
        if key == "adapter":
            value = [tuple(v) for v in value]
        setattr(args, key, value)
    return args


class EngineReplica:
    """A Serve deployment class (wrapped by ``serve.deployment`` in ``app.py``)."""

    def __init__(self, options: dict[str, Any]) -> None:
        from ray import serve

        from ..server.command import build_engine

        self.args = engine_args(options)
        self.engine, self.tokenizer, self.registry = build_engine(self.args)
        context = serve.get_replica_context()
        self.name = context.replica_id.unique_id
        self.node = socket.gethostname()

        async def hold(key: str) -> str:  # what Ray's multiplexing "loads": just the key (see the docstring)
            return key

        self._hold = serve.multiplexed(max_num_models_per_replica=self.args.max_loaded_adapters)(hold)
        logger.info("engine replica %s (pid %d) serving %d adapters", self.name, os.getpid(), len(self.registry))

    # ------------------------------------------------------------------ requests
    async def generate(self, prompt: Any, key: str | None, path: str | None, params: Any) -> AsyncIterator[Any]:
        """Stream: ``Accepted``/``Refused``, then the engine's ``RequestOutput`` deltas (``ReplicaStats`` before the last)."""
        from ..engine import EngineOverloaded, RequestRejected
        from ..errors import UnknownAdapterError

        if key is not None:
            await self._hold(key)
            if path is not None and key not in self.registry:
                self.registry.register(key, path)  # runtime-loaded at the ingress, validated there
        try:
            handle = await asyncio.to_thread(self.engine.submit, prompt, key, params)
        except UnknownAdapterError as exc:
            yield Refused("unknown_adapter", str(exc), self.name)
            return
        except EngineOverloaded as exc:
            yield Refused("overloaded", str(exc), self.name)
            return
        except RequestRejected as exc:
            yield Refused("rejected", str(exc), self.name)
            return
        try:
            yield Accepted(self.stats())
            async for out in handle.stream():
                if out.finished:
                    yield self.stats()
                yield out
                if out.finished:
                    break
        finally:  # the ingress cancelled (client gone) or the stream ended: free the batch slot
            handle.cancel()

    def describe(self) -> dict[str, Any]:
        """What the ingress's app reads of a local engine: the tokenizer (pickled by Ray), limits, vocabulary."""
        config = getattr(self.engine.model, "config", None)
        return {"tokenizer": self.tokenizer, "max_context": self.engine.max_context,
                "max_kv_tokens": self.engine.max_kv_tokens,
                "vocab_size": getattr(config, "vocab_size", None) or len(self.tokenizer)}

    def stats(self) -> ReplicaStats:
        try:
            resident = tuple(sorted(self.engine.cache.resident()))
        except Exception:
            resident = ()
        return ReplicaStats(self.name, os.getpid(), self.node, resident, dict(self.engine.stats()))

    # ------------------------------------------------------------------ health and lifecycle
    def check_health(self) -> None:
        """Ray calls this periodically; raising makes Ray replace the replica (a dead engine thread serves nothing)."""
        thread = getattr(self.engine, "_thread", None)
        if thread is None or not thread.is_alive():
            raise RuntimeError(f"replica {self.name}: the engine's step-loop thread is not running")

    def __del__(self) -> None:  # Ray calls it when it stops the replica (scale-down, shutdown)
        shutdown = getattr(getattr(self, "engine", None), "shutdown", None)
        if shutdown is not None:
            try:
                shutdown(abort=True, timeout=5.0)
            except Exception as exc:
                logger.warning("replica %s: engine shutdown failed: %s", getattr(self, "name", "?"), exc)
