"""API-key check and the containment rule for runtime-loaded adapter paths.

Runtime loading reads files named by a client, so the path is trusted only after
``os.path.realpath`` (which expands ``..`` and follows every symlink) lands inside one of the
configured roots. The adapter is then loaded from that real path, not from the client's string,
so a symlink swapped after the check still cannot point the loader elsewhere through the
checked name.
"""
from __future__ import annotations

import hmac
import os

from .errors import APIError


def check_api_key(authorization: str | None, x_api_key: str | None, expected: str | None) -> None:
    """Accept ``Authorization: Bearer KEY`` (what the openai client sends) or ``X-API-Key: KEY``."""
    if expected is None:
        return
    given = None
    if authorization:
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            given = value.strip()
    if given is None and x_api_key:
        given = x_api_key.strip()
    if given is None:
        raise APIError(401, "missing API key: send 'Authorization: Bearer <key>'", code="missing_api_key",
                       headers={"WWW-Authenticate": "Bearer"})
    if not hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8")):
        raise APIError(401, "incorrect API key", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


def resolve_inside_roots(path: str, roots: tuple[str, ...]) -> str:
    """Return the real path of ``path`` if it lies inside one of ``roots`` (already real paths).

    A relative ``path`` is taken relative to each root in turn. Raises APIError(400) when the path
    escapes every root (``..``, an absolute path elsewhere, a symlink pointing out), 404 when
    it does not exist; the message names the roots so the client knows what is allowed.
    """
    if not path or "\x00" in path:
        raise APIError(400, "lora_path is empty or holds a NUL byte", param="lora_path", code="invalid_path")
    candidates = [path] if os.path.isabs(path) else [os.path.join(root, path) for root in roots]
    missing: APIError | None = None  # a root where it would be inside but does not exist: try the next root
    for candidate in candidates:
        real = os.path.realpath(candidate)
        inside = [root for root in roots if _is_within(real, root)]
        if not inside:
            continue
        if real in inside:  # the root itself is a catalogue, not an adapter
            raise APIError(400, f"lora_path {path!r} is an adapter root itself; name one of its sub-directories",
                           param="lora_path", code="invalid_path")
        if not os.path.exists(real):
            missing = missing or APIError(404, f"lora_path {path!r} does not exist inside the adapter root"
                                          f"{'s' if len(roots) > 1 else ''} ({', '.join(roots)})",
                                          param="lora_path", code="adapter_not_found")
            continue
        if not os.path.isdir(real):
            raise APIError(400, f"lora_path {path!r} is not a directory inside the adapter root",
                           param="lora_path", code="invalid_path")
        return real
    if missing is not None:
        raise missing
    allowed = ", ".join(roots) if roots else "(none configured)"
    raise APIError(400, f"lora_path {path!r} resolves outside every adapter root; allowed roots: {allowed}",
                   param="lora_path", code="path_outside_root")


def _is_within(real: str, root: str) -> bool:
    try:
        return os.path.commonpath([real, root]) == root
    except ValueError:  # different drives on Windows
        return False
