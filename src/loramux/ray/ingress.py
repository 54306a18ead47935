"""The ingress deployment: loramux's own FastAPI app (``server.create_app``) over a ``RemoteEngine``.

Every route, the SSE streaming, auth, body limits, error shapes, metrics and runtime load/unload are
the single-process server's code, unchanged: ``create_app`` is handed an object with the engine's
interface (``submit`` -> a handle with ``stream()``/``cancel()``, ``stats()``, ``registry``,
``tokenizer``) whose requests run on the engine replicas through a Ray Serve DeploymentHandle with
``multiplexed_model_id`` = the adapter's key, so ``AdapterAffinityRouter`` can route by adapter.

What the ingress adds around the app:
- ``x-loramux-replica`` on every response: the replica that ran the request, else this ingress;
- a replica that dies mid-request: its requests end with a 503 in the OpenAI error shape (an error
  event then ``[DONE]`` on a stream that had started), never a hang (``item_timeout_s`` guards
  even a replica that hangs without dying);
- ``GET /replicas`` and per-replica series on ``/metrics`` (``fleet.py``).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import dataclasses
import logging
import os
import socket
import threading
import types
from typing import Any, AsyncIterator

from .fleet import Fleet
from .messages import Accepted, Refused, ReplicaStats

logger = logging.getLogger(__name__)

_served_by: contextvars.ContextVar[dict[str, str]] = contextvars.ContextVar("loramux_served_by")


def _lost_output(request_id: str, message: str) -> Any:
    """The final output of a request whose replica died: a ``LostOutput`` (a ``RequestOutput``), so
    the app's error mapping, wrapped in ``build_ingress_app``, answers 503 by type, not by message."""
    from ..engine import RequestOutput
    from ..engine.failures import Failure, FailureKind

    global LostOutput
    if LostOutput is None:
        @dataclasses.dataclass(frozen=True)
        class _LostOutput(RequestOutput):
            pass

        LostOutput = _LostOutput
    return LostOutput(request_id, None, [], "", finished=True, finish_reason="error", error=message,
                      failure=Failure(FailureKind.MODEL_ERROR, message))


LostOutput: Any = None  # defined on first use: importing loramux.engine pulls in torch


def _failed_output(request_id: str, message: str) -> Any:
    from ..engine import RequestOutput
    from ..engine.failures import Failure, FailureKind

    return RequestOutput(request_id, None, [], "", finished=True, finish_reason="error", error=message,
                         failure=Failure(FailureKind.MODEL_ERROR, message))


class ReplicaUnavailable(Exception):
    """No replica accepted the request in time, or the chosen one died before accepting it."""


class VersionedNames:
    """Adapter name -> the key replicas know it by; bumped whenever the ingress registry re-points or
    forgets the name (runtime load/unload), so an old copy resident in a replica is never reused."""

    def __init__(self, registry: Any) -> None:
        self._versions: dict[str, int] = {}
        self._lock = threading.Lock()
        registry.add_listener(self._changed)

    def _changed(self, name: str) -> None:
        with self._lock:
            self._versions[name] = self._versions.get(name, 0) + 1

    def key(self, name: str) -> str:
        version = self._versions.get(name, 0)
        return name if version == 0 else f"{name}#v{version}"


class RemoteHandle:
    """The ingress's end of one request running on a replica (the engine handle's async interface)."""

    def __init__(self, engine: "RemoteEngine", stream: Any, first: Accepted) -> None:
        self._engine, self._stream = engine, stream
        self.replica = first.stats.replica
        self.request_id = getattr(stream, "request_id", "")
        self._done = False

    async def stream(self) -> AsyncIterator[Any]:
        fleet, timeout = self._engine.fleet, self._engine.item_timeout_s
        while not self._done:
            try:
                item = await asyncio.wait_for(self._stream.__anext__(), timeout)
            except StopAsyncIteration:
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # ActorDiedError & co: the replica is gone; or it stalled past the guard
                self._done = True
                logger.warning("request on replica %s failed: %s: %s", self.replica, type(exc).__name__, exc)
                if isinstance(exc, asyncio.TimeoutError) or _is_replica_failure(exc):
                    fleet.lost(self.replica)
                    yield _lost_output(self.request_id, f"replica {self.replica} failed while running this request "
                                       f"({type(exc).__name__}); retry: Ray Serve routes new requests to live replicas")
                else:  # an exception raised inside the replica: a fault of ours (500), the replica lives on
                    yield _failed_output(self.request_id, f"replica {self.replica}: {type(exc).__name__}")
                return
            if isinstance(item, ReplicaStats):
                fleet.update(item)
                continue
            if getattr(item, "finished", False):
                self._done = True
            yield item

    def cancel(self) -> None:
        if not self._done:
            self._done = True
            try:
                self._stream.cancel()
            except Exception:  # already finished or the replica is gone
                pass


def _live_replicas() -> set[str] | None:
    try:
        from .router import live_replica_ids
    except ImportError:  # pragma: no cover - no Ray
        return None
    return live_replica_ids()


def _is_replica_failure(exc: BaseException) -> bool:
    try:
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
    except ImportError:  # pragma: no cover
        return False
    return isinstance(exc, (RayActorError, ActorDiedError, ActorUnavailableError))


class RemoteEngine:
    """What ``create_app`` needs of an engine, with the work done by the replicas."""

    cache = None  # no local cache: a reloaded name gets a new key instead (VersionedNames)

    def __init__(self, replicas: Any, registry: Any, described: dict[str, Any], *, accept_timeout_s: float = 60.0,
                 item_timeout_s: float = 600.0, affinity: bool = True) -> None:
        self.replicas = replicas  # DeploymentHandle of EngineReplica
        # affinity=False (the benchmark's baseline): no multiplexed model id, so that Ray's default router
        # is plain power of two choices (with an id it too prefers replicas that report the adapter)
        self.affinity = affinity
        self.registry = registry
        self.names = VersionedNames(registry)
        self.fleet = Fleet(_live_replicas)
        self.accept_timeout_s, self.item_timeout_s = accept_timeout_s, item_timeout_s
        self.loop: asyncio.AbstractEventLoop | None = None  # the app's loop, set by the header middleware
        # what the app reads of a local engine (EngineReplica.describe): the tokenizer (the app tokenizes
        # and applies chat templates itself), the context limits and the vocabulary size
        self.tokenizer = described["tokenizer"]
        self.max_context, self.max_kv_tokens = described["max_context"], described["max_kv_tokens"]
        self.model = types.SimpleNamespace(config=types.SimpleNamespace(vocab_size=described["vocab_size"]))

    def stats(self) -> dict[str, Any]:
        return self.fleet.totals()

    def submit(self, prompt: Any, adapter: str | None = None, params: Any = None) -> RemoteHandle:
        """Route to a replica and wait (in the caller's thread) until its engine accepts or refuses.

        Raises what ``Engine.submit`` raises (the app maps them to 404/503/400), plus
        ``EngineOverloaded`` when no replica answers within ``accept_timeout_s``.
        """
        from ..engine import EngineOverloaded, RequestRejected
        from ..errors import UnknownAdapterError

        key = path = None
        if adapter is not None:
            path = str(self.registry.path_of(adapter))  # UnknownAdapterError if unloaded meanwhile
            key = self.names.key(adapter)
        model_id = (key or "") if self.affinity else ""
        stream = self.replicas.options(stream=True, multiplexed_model_id=model_id).generate.remote(
            prompt, key, path, params)
        assert self.loop is not None, "the ingress app has not served a request yet"
        future = asyncio.run_coroutine_threadsafe(stream.__anext__(), self.loop)
        try:
            first = future.result(self.accept_timeout_s)
        except concurrent.futures.TimeoutError:
            future.cancel()
            stream.cancel()
            raise EngineOverloaded(f"no engine replica accepted the request within {self.accept_timeout_s:.0f} s") from None
        except Exception as exc:
            if _is_replica_failure(exc):
                raise EngineOverloaded(f"the engine replica died before accepting the request ({type(exc).__name__})") from None
            raise
        holder = _served_by.get(None)
        if isinstance(first, Refused):
            if holder is not None:
                holder["replica"] = first.replica
            error = {"unknown_adapter": UnknownAdapterError, "overloaded": EngineOverloaded,
                     "rejected": RequestRejected}.get(first.kind, RuntimeError)
            raise error(first.message)
        assert isinstance(first, Accepted), f"unexpected first message {type(first).__name__}"
        self.fleet.update(first.stats, accepted=True)
        if holder is not None:
            holder["replica"] = first.stats.replica
        return RemoteHandle(self, stream, first)


class ReplicaHeaderMiddleware:
    """Adds ``x-loramux-replica`` to every response (outermost ASGI layer: 401s and 404s carry it too)."""

    def __init__(self, app: Any, *, engine: RemoteEngine, name: str) -> None:
        self.app, self.engine, self.name = app, engine, name

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        self.engine.loop = asyncio.get_running_loop()
        holder: dict[str, str] = {}
        token = _served_by.set(holder)

        async def tagged_send(message: Any) -> None:
            if message["type"] == "http.response.start":
                value = holder.get("replica", self.name).encode()
                message = {**message, "headers": [*message.get("headers", []), (b"x-loramux-replica", value)]}
            await send(message)

        try:
            await self.app(scope, receive, tagged_send)
        finally:
            _served_by.reset(token)


def build_ingress_app(engine: RemoteEngine, config: Any, name: str) -> Any:
    """``create_app`` over the remote engine, plus the header, the 503 mapping and ``GET /replicas``."""
    from fastapi.responses import JSONResponse

    from ..server.app import create_app
    from ..server.errors import APIError

    app = create_app(engine, engine.tokenizer, config, registry=engine.registry)
    state = app.state.loramux
    app_output_error = state.output_error

    def output_error(call: Any, out: Any) -> Any:
        if LostOutput is not None and isinstance(out, LostOutput):
            return APIError(503, out.error, code="replica_unavailable", headers={"Retry-After": "1"})
        return app_output_error(call, out)

    state.output_error = output_error  # the instance's method, for this app only
    from .fleet import FleetCollector

    state.metrics.registry.register(FleetCollector(engine.fleet))

    @app.get("/replicas")
    async def replicas() -> Any:
        return JSONResponse({"object": "list", "data": engine.fleet.snapshot()})

    app.add_middleware(ReplicaHeaderMiddleware, engine=engine, name=name)
    return app


class LoramuxIngress:
    """The Serve ingress deployment class (``serve.ingress()`` late-binds its ASGI app, see ``app.py``)."""

    async def __init__(self, replicas: Any, options: dict[str, Any], accept_timeout_s: float = 60.0,
                       item_timeout_s: float = 600.0, affinity: bool = True) -> None:
        from ..cache import AdapterRegistry
        from ..server.command import build_registry, server_config_options
        from ..server.config import ServerConfig
        from .replica import engine_args

        args = engine_args(options)
        registry = build_registry(args, AdapterRegistry())
        self.config = ServerConfig(**server_config_options(args))
        described = await replicas.describe.remote()  # waits for the first engine replica to be up
        self.engine = RemoteEngine(replicas, registry, described, accept_timeout_s=accept_timeout_s,
                                   item_timeout_s=item_timeout_s, affinity=affinity)
        try:
            from ray import serve

            self.name = "ingress#" + serve.get_replica_context().replica_id.unique_id
        except Exception:
            self.name = f"ingress@{socket.gethostname()}:{os.getpid()}"

    def __serve_build_asgi_app__(self) -> Any:
        return build_ingress_app(self.engine, self.config, self.name)
