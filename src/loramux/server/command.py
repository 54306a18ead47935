"""``loramux serve``: the OpenAI-compatible server on one base model and many adapters.

With no arguments: the embedded default base model and the bundled adapters on 127.0.0.1:8000.
Module-level imports stay light (argparse only): ``loramux --help`` imports this module.

Shutdown: SIGINT or SIGTERM stops accepting connections, lets running requests finish for up to
``--shutdown-timeout`` seconds, cancels the rest (their engine requests are aborted), stops the
engine and exits 0. A second SIGINT skips the wait.
"""
from __future__ import annotations

import argparse
import functools
import logging
import os
import signal
import threading
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 8000


def _adapter_spec(value: str) -> tuple[str, str]:
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"--adapter {value!r}: expected NAME=PATH, e.g. --adapter sql=./adapters/sql")
    return name, path


def _positive(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return n


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model and adapters")
    g.add_argument("--base", default=None, metavar="PATH",
                   help="base model: a local transformers directory or a .gguf file (default: the embedded SmolLM2-135M-Instruct)")
    g.add_argument("--served-model-name", default=None, metavar="NAME",
                   help="the `model` name that selects the base model (default: the base model's directory or file name)")
    g.add_argument("--adapter", action="append", type=_adapter_spec, default=[], metavar="NAME=PATH",
                   help="serve the PEFT adapter in PATH as model NAME (repeatable)")
    g.add_argument("--adapter-root", action="append", default=[], metavar="DIR",
                   help="serve every sub-directory of DIR as an adapter named after it, loaded on first use (repeatable); "
                        "runtime loading reads only inside these directories")
    g.add_argument("--no-bundled-adapters", action="store_true",
                   help="with the default base model, do not serve the adapters shipped with loramux")
    g.add_argument("--dtype", "--base-dtype", dest="dtype", default=None,
                   help="base model dtype (default float32); int8: weight-only int8 linears (loramux.quantize)")
    g.add_argument("--allow-pickle", action="store_true",
                   help="also read adapter_model.bin (pickle can run code: only for adapters you trust)")

    g = parser.add_argument_group("engine and cache limits")
    g.add_argument("--max-loaded-adapters", type=_positive, default=32, help="adapters resident at once (default 32)")
    g.add_argument("--max-adapter-bytes", type=_positive, default=None, help="byte budget of resident adapters")
    g.add_argument("--preload-adapters", action="store_true",
                   help="load the registered adapters at start-up, in registry order, while they fit --max-loaded-adapters "
                        "and --max-adapter-bytes (as llama.cpp's --lora does); without it each loads on its first request")
    g.add_argument("--max-running", type=_positive, default=16, help="sequences in the running batch (default 16)")
    g.add_argument("--max-kv-tokens", type=_positive, default=16384, help="KV-cache tokens reserved at once (default 16384)")
    g.add_argument("--max-waiting", type=_positive, default=1024,
                   help="queued requests before new ones get 503 (default 1024)")
    g.add_argument("--threads", type=_positive, default=None, help="torch CPU threads (default: torch's choice)")

    g = parser.add_argument_group("HTTP")
    g.add_argument("--host", default=DEFAULT_HOST, help=f"bind address (default {DEFAULT_HOST})")
    g.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    g.add_argument("--api-key", default=os.environ.get("LORAMUX_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $LORAMUX_API_KEY, else no auth)")
    g.add_argument("--allow-runtime-loading", action="store_true",
                   help="enable POST /v1/load_lora_adapter and /v1/unload_lora_adapter (paths inside --adapter-root only)")
    g.add_argument("--max-body-bytes", type=_positive, default=1 << 20, help="largest request body (default 1 MiB)")
    g.add_argument("--shutdown-timeout", type=float, default=10.0,
                   help="seconds running requests get to finish after SIGINT/SIGTERM before they are aborted (default 10)")
    g.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="uvicorn log level (default info)")

    g = parser.add_argument_group("scale-out (Ray Serve; pip install 'loramux[ray]')")
    g.add_argument("--replicas", type=_positive, default=1,
                   help="engine replicas behind one endpoint, routed by adapter affinity (default 1: the plain "
                        "single process, no Ray); each holds the base model, an engine and --max-loaded-adapters")
    g.add_argument("--ray-address", default=None, metavar="auto|ADDR",
                   help="join this Ray cluster instead of starting a local one (which is shut down on exit)")


def base_model_name(base: str | None) -> str:
    if base is None:
        from ..base import DEFAULT_GGUF_NAME

        return DEFAULT_GGUF_NAME.split(".")[0]  # SmolLM2-135M-Instruct
    path = Path(base)
    return path.stem.split(".")[0] if path.suffix == ".gguf" else path.resolve().name


def bundled_adapters_dir() -> Path | None:
    """``src/loramux/adapters/``: the task adapters shipped with the package (one per sub-directory)."""
    path = Path(__file__).resolve().parent.parent / "adapters"
    return path if path.is_dir() else None


def build_registry(args: argparse.Namespace, registry: Any) -> Any:
    """Fill ``registry`` with the adapters the flags name (``--adapter``, ``--adapter-root``, the bundled
    ones); shared with ``loramux.ray``, whose ingress and replicas must know the same names."""
    for name, path in args.adapter:
        registry.register(name, path)
    for root in args.adapter_root:
        count = registry.add_root(root)
        logger.info("adapter root %s: %d adapters", root, count)
    bundled = bundled_adapters_dir()
    if args.base is None and not args.no_bundled_adapters and bundled is not None:
        logger.info("bundled adapters: %d", registry.add_root(bundled))
    return registry


def build_engine(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """Load the base model, wrap it, register the adapters, start the engine; (engine, tokenizer, registry)."""
    import torch

    from ..base import load_base
    from ..engine import AdapterRegistry, Engine
    from ..model import MultiLoraModel

    if args.threads:
        torch.set_num_threads(args.threads)
    registry = build_registry(args, AdapterRegistry())
    model, tokenizer = load_base(args.base, dtype=args.dtype)
    wrapped = MultiLoraModel(model)
    if args.allow_pickle:
        # the engine's cache calls model.load_adapter(path, adapter_name=, replace=) without this flag;
        # binding it on this one instance is how --allow-pickle reaches loads made on first use
        wrapped.load_adapter = functools.partial(wrapped.load_adapter, allow_pickle=True)  # type: ignore[method-assign]
    if args.preload_adapters:
        preload_adapters(wrapped, registry, args.max_loaded_adapters, args.max_adapter_bytes)
    engine = Engine(wrapped, tokenizer, registry=registry, max_running=args.max_running,
                    max_kv_tokens=args.max_kv_tokens, max_loaded_adapters=args.max_loaded_adapters,
                    max_adapter_bytes=args.max_adapter_bytes, max_waiting=args.max_waiting)
    return engine.start(), tokenizer, registry


def preload_adapters(model: Any, registry: Any, max_loaded: int | None, max_bytes: int | None) -> list[str]:
    """Load registered adapters into ``model`` before its engine exists, in registry order, while the count and
    bytes fit; returns their names. The engine's adapter cache adopts them as resident and evictable, as if each
    had been loaded on a first request. The byte budget is checked on the file header's estimate first, as the
    engine's cache does before a load. One that fails is logged with its reason and left to load on first use
    (its requests then get that error); the others still load."""
    from ..cache import element_size, estimate_nbytes

    loaded, used, size = [], 0, element_size(model)
    for name in registry.names():
        if max_loaded is not None and len(loaded) >= max_loaded:
            break
        path = registry.path_of(name)
        if max_bytes is not None and used + estimate_nbytes(path, size) > max_bytes:
            break
        try:
            info = model.load_adapter(path, adapter_name=name)
        except Exception as exc:  # noqa: BLE001 - a bad adapter must not stop the server from starting
            logger.warning("preloading adapter %s failed (it will load on first use): %s", name, exc)
            continue
        loaded.append(name)
        used += info.nbytes
    logger.info("preloaded %d adapters (%.1f MiB): %s", len(loaded), used / 2**20, ", ".join(loaded) or "none")
    return loaded


def server_config_options(args: argparse.Namespace) -> dict[str, Any]:
    """The ServerConfig keyword arguments the flags give (also used by ``loramux.ray``'s ingress)."""
    return dict(base_name=args.served_model_name or base_model_name(args.base),
                base_path=str(Path(args.base).resolve()) if args.base else None,
                api_key=args.api_key or None, allow_runtime_loading=args.allow_runtime_loading,
                allow_pickle=args.allow_pickle, adapter_roots=tuple(args.adapter_root),
                max_body_bytes=args.max_body_bytes)


def run(args: argparse.Namespace) -> int:
    if getattr(args, "replicas", 1) > 1 or getattr(args, "ray_address", None):
        from ..ray.command import run as run_on_ray  # Ray Serve: loramux/ray/command.py

        return run_on_ray(args)
    import uvicorn

    from .app import create_app
    from .config import ServerConfig

    try:  # flag errors first, before seconds of model loading
        config = ServerConfig(**server_config_options(args))
    except ValueError as exc:
        logger.error("%s", exc)
        return 2
    if not 0 <= args.port < 65536:
        logger.error("--port %d is not a TCP port (0-65535)", args.port)
        return 2

    engine, tokenizer, registry = build_engine(args)
    app = create_app(engine, tokenizer, config, registry=registry)
    state = app.state.loramux
    # uvicorn's own grace period is only a backstop: the abort timer below ends streams properly first
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                           lifespan="off", timeout_graceful_shutdown=args.shutdown_timeout + 5,
                                           access_log=args.log_level == "debug"))
    # uvicorn catches SIGINT/SIGTERM itself, and re-raises the signal to the handler it found at start
    # once it has shut down; a no-op handler here turns that re-raise into a plain exit 0.
    previous = {sig: signal.signal(sig, _ignore) for sig in (signal.SIGINT, signal.SIGTERM)}
    original_exit = server.handle_exit

    def abort_running() -> None:
        logger.warning("shutdown: aborting the requests still running after %.1f s", args.shutdown_timeout)
        engine.shutdown(abort=True, timeout=5.0)  # their streams end with finish_reason "abort" and [DONE]

    abort_timer = threading.Timer(args.shutdown_timeout, abort_running)
    abort_timer.daemon = True

    def handle_exit(sig: int, frame: Any) -> None:
        if not state.closing:  # first signal: stop taking work, give running requests the grace period
            state.closing = True  # /health says 503, new requests on open connections get 503
            abort_timer.start()
        original_exit(sig, frame)

    server.handle_exit = handle_exit  # type: ignore[method-assign]
    logger.info("serving %s and %d adapters on http://%s:%d", config.base_name, len(registry.names()),
                args.host, args.port)
    try:
        server.run()
    finally:
        state.closing = True
        abort_timer.cancel()
        engine.shutdown(abort=True, timeout=5.0)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if not server.started:  # could not bind, or startup failed
        logger.error("the server did not start (see the log above)")
        return 1
    logger.info("shut down cleanly")
    return 0


def _ignore(signum: int, frame: Any) -> None:
    return None
