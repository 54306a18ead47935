"""Prompt KV kept after a request ends, reused by later requests that start with the same tokens.

A later request with the same adapter *content* and the same leading tokens (a system prompt, the
earlier turns of a chat, a few-shot header) copies the cached keys/values of the common prefix and
prefills only the rest. The owner of an entry is the model's ``AdapterInfo`` object of the load that
produced it (or the base sentinel): every ``load_adapter`` makes a new one, so an adapter reloaded
under the same name with new weights never matches KV computed with the old ones (vLLM keys by name
and serves stale KV after a same-name reload, its issue #30931). The entry holds a reference to its
owner, so the identity cannot be recycled while the entry lives.

Bounded by bytes, least recently used first out. Engine thread only (no lock).

Shapes: per layer keys/values (1, H, P, D) for a prompt of P tokens.
"""
from __future__ import annotations

import itertools
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Sequence

import torch

KV = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass(eq=False)
class _Entry:
    owner: Any
    tokens: tuple[int, ...]
    tensors: KV
    nbytes: int


def common_prefix(a: Sequence[int], b: Sequence[int], limit: int) -> int:
    """Length of the longest common prefix of ``a`` and ``b``, at most ``limit`` (binary search over
    C-speed slice compares: a few comparisons for a 200-token prompt, not 200 Python steps)."""
    hi = min(len(a), len(b), limit)
    a, b = tuple(a[:hi]), tuple(b[:hi])
    if a == b:
        return hi
    lo = 0  # a[:lo] == b[:lo] holds, a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo


class PrefixCache:
    """Byte-bounded LRU of prompt KV; ``max_bytes == 0`` turns it off."""

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"prefix_cache_bytes must be >= 0 (0 = off), got {max_bytes}")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[int, _Entry] = OrderedDict()  # LRU first
        self._ids = itertools.count()
        self.bytes = 0
        self.hit_tokens = 0
        self.hits = 0
        self.queries = 0

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def __len__(self) -> int:
        return len(self._entries)

    def stats(self) -> dict[str, int]:
        return {"prefix_cache_hit_tokens": self.hit_tokens, "prefix_cache_hits": self.hits,
                "prefix_cache_queries": self.queries, "prefix_cache_bytes": self.bytes,
                "prefix_cache_entries": len(self._entries)}

    def lookup(self, owner: Any, prompt: Sequence[int]) -> tuple[int, KV] | None:
        """The longest cached prefix of ``prompt`` for ``owner`` (at most ``len(prompt) - 1`` tokens: the
        last prompt token is always fed, it gives the first logits): (length, per-layer views)."""
        if not self.enabled or owner is None:
            return None
        self.queries += 1
        best_key, best = None, 0
        for key, entry in self._entries.items():
            if entry.owner is owner and entry.tokens and prompt and entry.tokens[0] == prompt[0]:
                n = common_prefix(entry.tokens, prompt, len(prompt) - 1)
                if n > best:
                    best_key, best = key, n
        if best_key is None:
            return None
        self._entries.move_to_end(best_key)
        self.hits += 1
        self.hit_tokens += best
        return best, [(k[:, :, :best], v[:, :, :best]) for k, v in self._entries[best_key].tensors]

    def covers(self, owner: Any, prompt: Sequence[int]) -> bool:
        """Whether an entry of ``owner`` already holds all of ``prompt`` (then nothing new to keep)."""
        return any(e.owner is owner and len(e.tokens) >= len(prompt) and e.tokens[: len(prompt)] == tuple(prompt)
                   for e in self._entries.values())

    def insert(self, owner: Any, prompt: Sequence[int], tensors: KV) -> None:
        """Keep ``tensors`` (a copy the cache now owns) as the KV of ``prompt`` under ``owner``."""
        if not self.enabled or owner is None or not prompt:
            return
        tokens = tuple(prompt)
        nbytes = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in tensors)
        if nbytes > self.max_bytes:
            return
        for key, entry in list(self._entries.items()):  # an entry this one extends is redundant now
            if entry.owner is owner and len(entry.tokens) <= len(tokens) and tokens[: len(entry.tokens)] == entry.tokens:
                self._drop(key)
        while self.bytes + nbytes > self.max_bytes and self._entries:
            self._drop(next(iter(self._entries)))
        self._entries[next(self._ids)] = _Entry(owner, tokens, tensors, nbytes)
        self.bytes += nbytes

    def _drop(self, key: int) -> None:
        self.bytes -= self._entries.pop(key).nbytes

    def clear(self) -> None:
        self._entries.clear()
        self.bytes = 0
