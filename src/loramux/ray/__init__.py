"""Scale-out on Ray Serve: an ingress with the OpenAI-compatible API and N engine replicas, routed by adapter.

- ``app.py``: ``build_app(options, replicas=N) -> serve.Application`` (and ``app_builder`` for ``serve deploy``);
- ``ingress.py``: ``server.create_app`` over a ``RemoteEngine`` whose requests run on the replicas;
- ``replica.py``: ``EngineReplica``, one base model + ``Engine`` + adapter cache per replica;
- ``router.py``: ``AdapterAffinityRouter`` (Ray's request-router API) driving ``routing.py``'s pure policy;
- ``command.py``: ``loramux serve --replicas N [--ray-address ADDR]``.

Needs the ``ray`` extra (``pip install 'loramux[ray]'``); importing this package does not import Ray.
"""
from __future__ import annotations

from typing import Any

__all__ = ["build_app"]


def build_app(*args: Any, **kwargs: Any) -> Any:
    from .app import build_app as _build_app

    return _build_app(*args, **kwargs)
