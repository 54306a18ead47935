"""OpenAI-compatible HTTP server on top of :class:`loramux.engine.Engine`.

``create_app(engine, ...)`` builds the FastAPI application; it needs no socket, so tests drive it
through an ASGI transport. ``loramux serve`` (``command.py``) loads the base model and adapters,
starts the engine and runs the app under uvicorn.

Imports here are lazy: ``loramux --help`` imports ``loramux.server.command`` and must not pay for
FastAPI, pydantic or torch.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["create_app", "ServerConfig"]

if TYPE_CHECKING:  # pragma: no cover
    from .app import create_app
    from .config import ServerConfig


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from .app import create_app

        return create_app
    if name == "ServerConfig":
        from .config import ServerConfig

        return ServerConfig
    raise AttributeError(f"module 'loramux.server' has no attribute {name!r}")
