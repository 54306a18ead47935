"""``build_app(...) -> serve.Application``: the ingress plus N engine replicas, for ``serve.run`` and ``serve deploy``.

    from ray import serve
    from loramux.ray import build_app
    serve.run(build_app({"adapter_root": ["/adapters"], "threads": 4}, replicas=4), route_prefix="/")

``options`` are ``loramux serve``'s options with underscores (``base``, ``adapter`` as
``[[name, path], ...]``, ``adapter_root``, ``max_loaded_adapters``, ``api_key``,
``allow_runtime_loading``...); relative paths are resolved on each replica's machine, so give
absolute ones. ``app_builder`` is the same for a ``serve deploy`` config (see
``examples/ray_serve_config.yaml``).
"""
from __future__ import annotations

from typing import Any

INGRESS_NAME, ENGINE_NAME = "loramux_ingress", "loramux_engine"


def build_app(options: dict[str, Any] | None = None, *, replicas: int = 2, replica_cpus: float | None = None,
              max_ongoing_requests: int | None = None, affinity: bool = True, health_check_period_s: float = 2.0,
              health_check_timeout_s: float = 30.0, accept_timeout_s: float = 60.0, item_timeout_s: float = 600.0,
              graceful_shutdown_timeout_s: float = 10.0, ray_actor_options: dict[str, Any] | None = None) -> Any:
    """The Serve application.

    ``replicas`` engine replicas, each reserving ``replica_cpus`` (default: ``options["threads"]`` or 1)
    and taking up to ``max_ongoing_requests`` at once (default 4 x ``max_running``: loramux queues and
    batches inside the replica; Ray holds the rest in its router). ``affinity=False`` keeps Ray's
    default power-of-two-choices router and sends no multiplexed model id (the benchmark's baseline:
    routing by queue length only).
    """
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    from .ingress import LoramuxIngress
    from .replica import EngineReplica, engine_args
    from .router import AdapterAffinityRouter

    options = dict(options or {})
    args = engine_args(options)  # unknown option names fail here, not in a replica
    if replicas < 1:
        raise ValueError(f"replicas ({replicas}) must be >= 1")
    cpus = float(replica_cpus if replica_cpus is not None else (args.threads or 1))
    router = (RequestRouterConfig(request_router_class=AdapterAffinityRouter,
                                  request_router_kwargs={"capacity": args.max_loaded_adapters})
              if affinity else RequestRouterConfig())
    engine = serve.deployment(
        EngineReplica, name=ENGINE_NAME, num_replicas=replicas,
        max_ongoing_requests=max_ongoing_requests or 4 * args.max_running,
        ray_actor_options={"num_cpus": cpus, **(ray_actor_options or {})},
        health_check_period_s=health_check_period_s, health_check_timeout_s=health_check_timeout_s,
        graceful_shutdown_timeout_s=graceful_shutdown_timeout_s, request_router_config=router)
    ingress = serve.deployment(
        serve.ingress()(LoramuxIngress), name=INGRESS_NAME, num_replicas=1, ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=max(1024, args.max_waiting))
    return ingress.bind(engine.bind(options), options, accept_timeout_s=accept_timeout_s,
                        item_timeout_s=item_timeout_s, affinity=affinity)


def app_builder(args: dict[str, Any]) -> Any:
    """``serve deploy`` / ``serve run module:app_builder``: ``args`` = build_app's keywords, ``options`` among them."""
    args = dict(args or {})
    return build_app(args.pop("options", None), **args)
