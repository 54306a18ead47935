"""The engine: a thread that runs the step loop over a MultiLoraModel, fed by ``submit``.

(Signatures published first for the server; the step loop lands next.)
"""
from __future__ import annotations

import logging
from typing import Any, Sequence

from loramux.cache import AdapterRegistry
from loramux.engine.request import RequestHandle, RequestOutput, SamplingParams

logger = logging.getLogger(__name__)


class Engine:
    """Continuous batching over one ``MultiLoraModel``; see the package docstring."""

    def __init__(self, model: Any, tokenizer: Any = None, *, registry: AdapterRegistry | None = None,
                 max_running: int = 16, max_kv_tokens: int = 16384, max_loaded_adapters: int | None = 32,
                 max_adapter_bytes: int | None = None, max_waiting: int = 1024, prefill_chunk: int = 256,
                 max_context: int | None = None, host_cache_bytes: int | None = None) -> None:
        raise NotImplementedError

    def start(self) -> "Engine":
        raise NotImplementedError

    def __enter__(self) -> "Engine":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.shutdown(abort=exc[0] is not None)

    def submit(self, prompt: str | Sequence[int], adapter: str | None = None, params: SamplingParams | None = None,
               *, request_id: str | None = None) -> RequestHandle:
        raise NotImplementedError

    def generate(self, prompts: Sequence[str | Sequence[int]], adapters: Sequence[str | None] | None = None,
                 params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[RequestOutput]:
        """Submit all, wait for all; results in input order (errors as finish_reason 'error')."""
        raise NotImplementedError

    def step(self) -> bool:
        """One iteration of the loop (admit, prefill a bounded chunk, decode one token per row)."""
        raise NotImplementedError

    def stats(self) -> dict[str, Any]:
        raise NotImplementedError

    def shutdown(self, abort: bool = False, timeout: float | None = None) -> None:
        raise NotImplementedError
