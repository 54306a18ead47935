"""Structured outputs: ``response_format`` (``json_object``, ``json_schema``) as per-row token masks.

The grammar library is llguidance (``pip install 'loramux[structured]'``). Measured on the default
model's tokenizer (49,152 tokens, one CPU thread; ``benchmarks/bench_structured.py``): a mask costs
microseconds per token with either llguidance or xgrammar, three orders of magnitude under a decode
step, so the per-step figure did not decide between them; the footprint did: llguidance has no
dependencies (7.6 MB), xgrammar 0.2.8 pulls triton (~1 GB) and a TVM runtime into a CPU install.

Each sequence gets its own ``GrammarConstraint`` (the engine's ``TokenConstraint``: ``allowed``,
``accept``, ``is_finished``); rows without one pay nothing, so a batch mixes free rows and rows of
different schemas. Schemas are compiled once per distinct schema (LRU) and validated before the
request is submitted: a schema llguidance cannot enforce is a 400 naming the problem, never an
unconstrained answer.
"""
from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from typing import Any, Callable, Optional

import numpy as np
import torch

from .errors import APIError

logger = logging.getLogger(__name__)

# bit b of byte k is token 8k + b (32-bit little-endian words): unpackbits(bitorder="little")
# compact JSON: a model cannot spend its max_tokens on whitespace, and a strict schema's output
# is what json.loads reads either way
_JSON_OPTIONS = {"whitespace_flexible": False, "lenient": False}


class GrammarConstraint:
    """One sequence's grammar state; see ``loramux.engine.constraints.TokenConstraint``."""

    def __init__(self, matcher: Any) -> None:
        self.matcher = matcher

    def allowed(self, vocab_size: int) -> torch.Tensor:
        packed = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)  # (ceil(V/32)*4,) bytes
        if self.matcher.is_error():
            raise RuntimeError(f"grammar error: {self.matcher.get_error()}")
        # numpy, not torch shifts: ~40 us here against ~4 ms for six small torch ops waking the OpenMP pool
        mask = torch.from_numpy(np.unpackbits(packed, bitorder="little").view(np.bool_))  # (bytes*8,)
        if mask.numel() < vocab_size:  # the model's vocabulary is padded beyond the tokenizer's
            mask = torch.cat([mask, torch.zeros(vocab_size - mask.numel(), dtype=torch.bool)])
        return mask[:vocab_size]  # (V,)

    def accept(self, token_id: int) -> None:
        if not self.matcher.consume_token(token_id):
            raise RuntimeError(f"token {token_id} rejected by the grammar: {self.matcher.get_error()}")

    def is_finished(self) -> bool:
        return bool(self.matcher.is_stopped())


class StructuredOutputs:
    """Compiles ``response_format`` into constraint factories for one tokenizer (thread-safe)."""

    def __init__(self, tokenizer: Any, vocab_size: Optional[int], cache_size: int = 64) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.cache_size = cache_size
        self._lock = threading.Lock()
        self._lltok: Any = None
        self._grammars: OrderedDict[str, str] = OrderedDict()

    def _tokenizer(self) -> Any:
        with self._lock:
            if self._lltok is None:
                try:
                    import llguidance.hf
                except ImportError:
                    raise APIError(400, "response_format needs the llguidance package on the server "
                                   "(pip install 'loramux[structured]')", param="response_format",
                                   code="unsupported_parameter") from None
                if self.tokenizer is None:
                    raise APIError(400, "response_format needs the base model's tokenizer", param="response_format",
                                   code="unsupported_parameter")
                eos = getattr(self.tokenizer, "eos_token_id", None)
                self._lltok = llguidance.hf.from_tokenizer(self.tokenizer, n_vocab=self.vocab_size,
                                                           eos_token=eos if isinstance(eos, int) else None)
            return self._lltok

    def grammar(self, response_format: Any) -> str:
        """The llguidance grammar of ``response_format`` (a ``schemas.ResponseFormat``), checked."""
        import llguidance

        if response_format.type == "json_object":
            schema: dict[str, Any] = {"type": "object"}
        else:
            schema = response_format.json_schema.schema_
        key = json.dumps(schema, sort_keys=True)
        lltok = self._tokenizer()
        with self._lock:
            if key in self._grammars:
                self._grammars.move_to_end(key)
                return self._grammars[key]
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=_JSON_OPTIONS)
            # (is_error, messages); a warning also means part of the schema would not be enforced
            is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, lltok)
        except (ValueError, TypeError, RuntimeError) as exc:
            is_error, messages = True, [str(exc)]
        if is_error or messages:
            raise APIError(400, f"response_format.json_schema cannot be enforced: {'; '.join(messages)[:500]}",
                           param="response_format", code="invalid_schema")
        with self._lock:
            self._grammars[key] = grammar
            while len(self._grammars) > self.cache_size:
                self._grammars.popitem(last=False)
        return grammar

    def factory(self, response_format: Any) -> Callable[[], GrammarConstraint]:
        """A ``SamplingParams.constraint`` factory: a fresh matcher per sequence."""
        import llguidance

        grammar, lltok = self.grammar(response_format), self._tokenizer()

        def make() -> GrammarConstraint:
            return GrammarConstraint(llguidance.LLMatcher(lltok, grammar))

        return make
