"""``loramux serve --replicas N [--ray-address auto|ADDR]``: the server on Ray Serve.

Without ``--ray-address`` a local Ray instance is started (no dashboard) and shut down on exit,
which ends every process it started (GCS, raylet, workers, replicas). With one, loramux joins that
cluster and on exit deletes only its own application. SIGINT/SIGTERM: both paths stop serving
and exit 0; ``--shutdown-timeout`` bounds how long the replicas' running requests get to finish
(Ray's graceful-shutdown wait for the replicas).
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)
APP_NAME = "loramux"


def replica_options(args: argparse.Namespace) -> dict[str, Any]:
    """The serve flags as ``build_app`` options, paths made absolute (replicas may run elsewhere)."""
    from ..server.command import add_arguments

    parser = argparse.ArgumentParser(add_help=False)
    add_arguments(parser)
    keys = set(vars(parser.parse_args([])))
    options = {k: v for k, v in vars(args).items() if k in keys}
    if options.get("base") and not str(options["base"]).startswith(("hf:",)) and Path(options["base"]).exists():
        options["base"] = str(Path(options["base"]).resolve())
    options["adapter"] = [[name, str(Path(path).resolve())] for name, path in options.get("adapter", [])]
    options["adapter_root"] = [str(Path(root).resolve()) for root in options.get("adapter_root", [])]
    return options


def run(args: argparse.Namespace) -> int:
    try:
        import ray
        from ray import serve
    except ImportError:
        logger.error("--replicas %d needs Ray Serve: pip install 'loramux[ray]'", args.replicas)
        return 2
    from ..server.command import server_config_options
    from ..server.config import ServerConfig
    from .app import build_app

    try:  # flag errors before Ray starts
        ServerConfig(**server_config_options(args))
        options = replica_options(args)
        app = build_app(options, replicas=args.replicas, replica_cpus=args.threads or 1,
                        graceful_shutdown_timeout_s=args.shutdown_timeout)
    except ValueError as exc:
        logger.error("%s", exc)
        return 2

    stop = threading.Event()
    previous: dict[int, Any] = {}
    started_ray = args.ray_address is None
    try:
        if started_ray:
            cpus = max(os.cpu_count() or 1, args.replicas * (args.threads or 1))
            ray.init(num_cpus=cpus, include_dashboard=False, logging_level=logging.WARNING)
        else:
            ray.init(address=args.ray_address, logging_level=logging.WARNING)
        # after ray.init, which installs a C++ SIGTERM handler that aborts the process (exit -6)
        previous = {sig: signal.signal(sig, lambda s, f: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
        serve.start(http_options={"host": args.host, "port": args.port})
        if stop.is_set():
            return 0
        logger.info("starting %d engine replicas on Ray (%s)", args.replicas,
                    "local instance" if started_ray else args.ray_address)
        serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
        logger.info("serving on http://%s:%d with %d replicas (Ray Serve)", args.host, args.port, args.replicas)
        while not stop.wait(0.5):
            pass
        logger.info("shutting down")
        return 0
    except Exception as exc:  # e.g. the port is taken, or no cluster at --ray-address
        logger.error("Ray Serve did not start: %s: %s", type(exc).__name__, exc)
        return 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _stop(ray, serve, started_ray)


def _stop(ray: Any, serve: Any, started_ray: bool) -> None:
    if not ray.is_initialized():
        return
    try:
        if started_ray:
            serve.shutdown()
        else:
            serve.delete(APP_NAME)
    except Exception as exc:
        logger.warning("Ray Serve shutdown: %s", exc)
    ray.shutdown()
