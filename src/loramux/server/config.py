"""ServerConfig: what the HTTP layer needs to know beyond the engine itself."""
from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class ServerConfig:
    """Settings of the HTTP layer; validated once so that a bad flag fails at start, not per request.

    ``base_name`` is the ``model`` value that selects the base model (no adapter). ``adapter_roots``
    are the only directories runtime loading may read from (``/v1/load_lora_adapter``); they are
    stored resolved (``realpath``) so that later containment checks compare real paths.
    """

    base_name: str = "base"
    base_path: str | None = None
    api_key: str | None = None
    allow_runtime_loading: bool = False
    allow_pickle: bool = False  # runtime loads of adapter_model.bin (pickle can run code)
    adapter_roots: tuple[str, ...] = ()
    max_body_bytes: int = 1 << 20  # 1 MiB: far above any prompt the context can hold
    default_max_tokens: int = 16  # the OpenAI default for /v1/completions
    default_chat_max_tokens: int = 256
    max_stop_sequences: int = 8

    def __post_init__(self) -> None:
        if not self.base_name or not self.base_name.strip():
            raise ValueError(f"base_name ({self.base_name!r}) must be a non-empty model name")
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key ('') must be None (no auth) or a non-empty string")
        if self.max_body_bytes < 1024:
            raise ValueError(f"max_body_bytes ({self.max_body_bytes}) must be >= 1024")
        for name in ("default_max_tokens", "default_chat_max_tokens", "max_stop_sequences"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} ({getattr(self, name)}) must be >= 1")
        roots = []
        for root in self.adapter_roots:
            real = os.path.realpath(root)
            if not os.path.isdir(real):
                raise ValueError(f"adapter root {root!r} is not a directory; create it or drop --adapter-root")
            roots.append(real)
        object.__setattr__(self, "adapter_roots", tuple(roots))
        if self.allow_runtime_loading and not roots:
            raise ValueError(
                "allow_runtime_loading needs at least one adapter root (--adapter-root DIR): "
                "runtime loading only reads inside those directories"
            )
