"""One engine step over the engine thread's own state: the prefilling queue and the decode batch.

``Stepper.step`` (called by ``Engine.step``):

1. a request about to be prefilled looks up the prefix cache (then, not at admission: requests
   admitted together with the same prompt hit what the first of them just prefilled): a hit
   copies the cached KV of their common prefix and only the rest of the prompt is prefilled;
2. prefill, at most ``prefill_chunk`` prompt tokens this step (a long prompt is cut into chunks
   over several steps), so running decodes never wait for more than one chunk. All but the last
   prompt token are prefilled: the prompt[:-1] KV is kept in the prefix cache and forked into one
   batch row per sequence (no recompute), and the decode forward below feeds each such row the
   last prompt token, whose logits give its first token. So a prompt the prefix cache holds costs
   no forward of its own (a decode step reads every weight once for all rows; a forward for one
   token would read them all again). Requests asking for prompt logprobs (every position's
   logits), and one-token prompts, prefill the whole prompt and pick their first token from it;
3. one decode forward for every row of the batch, whatever its adapter; pick; stream deltas;
   finished rows leave the batch at once.

Isolation: a fault in one row's own work (its sampling, NaN/inf logits, its constraint, its stop
strings or detokenizer, its prompt logprobs) fails that request alone (``FailureKind.ROW_FAILED``)
and the other rows' tokens are what they would have been without it. A fault in a shared forward
fails the requests in that forward (``MODEL_ERROR``): one request's prefill, or the decode batch;
the engine keeps serving.
"""
from __future__ import annotations

import logging
from typing import Any, Callable

import torch

from loramux.engine import kv as kvops
from loramux.engine.batch import DecodeBatch
from loramux.engine.detokenize import IncrementalText
from loramux.engine.failures import Failure, FailureKind, RowFailed, describe
from loramux.engine.logprobs import TokenLogprob, token_logprobs
from loramux.engine.prefix_cache import PrefixCache
from loramux.engine.request import Request, RequestOutput, Sequence
from loramux.engine.sampling import make_generator, pick_tokens

logger = logging.getLogger(__name__)

ABORTED = Failure(FailureKind.ABORTED, "cancelled before it finished")


class Stepper:
    """The step loop's state and work; see the module docstring. Engine thread only.

    ``forward(kv, input_ids, position_ids, routing, all_logits)`` runs the model; ``prepare`` turns
    the rows' adapter loads (``Request.load``, pinned) into that routing; ``owner(req)`` is the
    prefix-cache owner of its load; ``retire(req)`` is called once when a request has ended.
    """

    def __init__(self, *, scheduler: Any, tokenizer: Any, device: torch.device, forward: Callable[..., torch.Tensor],
                 prepare: Callable[[list[Any]], Any], owner: Callable[[Request], Any],
                 retire: Callable[[Request], None], prefix_cache: PrefixCache, prefill_chunk: int,
                 counters: dict[str, Any]) -> None:
        self.scheduler, self.tokenizer = scheduler, tokenizer
        self.device = device
        self._forward, self._prepare, self._owner, self._retire = forward, prepare, owner, retire
        self.prefix_cache, self.prefill_chunk, self.counters = prefix_cache, prefill_chunk, counters
        self.prefilling: list[Request] = []  # admitted, prompt not fully in the KV cache yet
        self.batch = DecodeBatch(prepare)

    def has_work(self) -> bool:
        return bool(self.prefilling or self.batch)

    def requests(self) -> list[Request]:
        """The admitted requests: prefilling here, or with rows in the decode batch (each in one place)."""
        return [*self.prefilling, *{id(s.req): s.req for s in self.batch.rows}.values()]

    # ------------------------------------------------------------------ admission, prefill
    def admit(self, req: Request) -> None:
        """A request the scheduler admitted: queue its prefill."""
        req.owner = self._owner(req)
        self.prefilling.append(req)

    def _take_cached_prefix(self, req: Request) -> None:
        """Start ``req``'s prompt KV from the longest prefix the cache holds of it, if any."""
        if req.params.prompt_logprobs is None:  # those need the logits of every prompt position
            hit = self.prefix_cache.lookup(req.owner, req.prompt_ids)
            if hit is not None:
                req.cached_tokens, tensors = hit
                req.kv_part, req.prefilled = kvops.RowsKV.holding(tensors), req.cached_tokens

    @staticmethod
    def _prefill_target(req: Request) -> int:
        """Prompt tokens to prefill before joining the batch: all but the last, which the decode step feeds
        (see the module docstring), unless prompt logprobs need every position or the prompt is one token."""
        total = len(req.prompt_ids)
        return total if req.params.prompt_logprobs is not None or total < 2 else total - 1

    def prefill(self) -> None:
        """Feed at most ``prefill_chunk`` prompt tokens (more when no decode waits)."""
        budget = self.prefill_chunk if self.batch else 4 * self.prefill_chunk
        while budget > 0 and self.prefilling:
            req = self.prefilling[0]
            if req.kv_part is None:
                self._take_cached_prefix(req)
            if req.kv_part is not None and req.prefilled == self._prefill_target(req) < len(req.prompt_ids):
                self.prefilling.pop(0)  # the cache held all but the last token: no forward of its own
                self._start(req, None)
                continue
            try:
                logits, fed = self._prefill_chunk(req, budget)
            except Exception as exc:  # noqa: BLE001 - this request's own forward: it alone fails
                logger.exception("prefill of request %s failed", req.request_id)
                self.prefilling.pop(0)
                req.kv_part = None
                kind = FailureKind.ROW_FAILED if isinstance(exc, RowFailed) else FailureKind.MODEL_ERROR
                self.end(req, "error", Failure(kind, describe(exc)))
                continue
            budget -= fed
            if req.prefilled == self._prefill_target(req):
                self.prefilling.pop(0)
                self._start(req, logits if req.prefilled == len(req.prompt_ids) else None)

    def _prefill_chunk(self, req: Request, budget: int) -> tuple[torch.Tensor, int]:
        """One forward of the next prompt chunk; returns the last position's logits (1, V) and the count fed."""
        if req.kv_part is None:
            req.kv_part = kvops.RowsKV()
            req.kv_part.begin(1)
        start, total = req.prefilled, len(req.prompt_ids)
        n = min(budget, self._prefill_target(req) - start)
        device = self.device
        chunk = torch.tensor([req.prompt_ids[start: start + n]], device=device)  # (1, n)
        pos = torch.arange(start, start + n, device=device).unsqueeze(0)  # (1, n)
        k = req.params.prompt_logprobs
        logits = self._forward(req.kv_part, chunk, pos, self._prepare([req.load]), all_logits=k is not None)
        if k is not None:  # logits: (1, n, V); position j predicts prompt token start + j + 1
            if req.prompt_logprobs is None:
                req.prompt_logprobs = [None]  # the first prompt token has no logprob
            m = min(n, total - 1 - start)
            if m > 0:
                req.prompt_logprobs += token_logprobs(logits[0, :m], req.prompt_ids[start + 1: start + 1 + m], k)
            logits = logits[:, -1]  # (1, V)
        req.prefilled += n
        self.counters["prompt_tokens"] += n
        return logits, n

    def _start(self, req: Request, logits: torch.Tensor | None) -> None:
        """The prompt is in ``req.kv_part``: keep it in the prefix cache and fork the KV row into one batch
        row per live sequence. With ``logits`` (1, V) of the last prompt position, each sequence's first
        token is picked from them first; without, ``req.kv_part`` holds all but the last prompt token,
        which the next decode step feeds (``DecodeBatch.inputs``)."""
        part = req.kv_part
        req.kv_part = None
        held = req.prompt_ids if logits is not None else req.prompt_ids[:-1]
        if self.prefix_cache.enabled and req.owner is not None and not self.prefix_cache.covers(req.owner, held):
            self.prefix_cache.insert(req.owner, held, part.window())
        for seq in req.seqs:
            try:
                self._init_seq(seq, self.device)
            except Exception as exc:  # noqa: BLE001 - e.g. the constraint factory raised
                self.end(req, "error", Failure(FailureKind.ROW_FAILED, describe(exc)))
                return
        if logits is not None:
            self.advance(req.seqs, logits.expand(req.n, -1))  # (1, V) -> (n, V), a view
        else:
            self.counters["prompt_tokens"] += 1  # fed by the decode step
        alive = [s for s in req.seqs if not s.finished]
        for i, seq in enumerate(alive):
            self.batch.join(seq, part if i == len(alive) - 1 else part.copy())

    def _init_seq(self, seq: Sequence, device: torch.device) -> None:
        params = seq.params
        seq.detok = IncrementalText(self.tokenizer, params.stop)
        if not params.greedy:
            seq.generator = make_generator(seq.seed, device)
        if params.constraint is not None:
            seq.constraint = params.constraint()

    # ------------------------------------------------------------------ decode
    def decode(self) -> None:
        batch = self.batch
        if not batch:
            return
        last, pos = batch.inputs(self.device)
        try:
            logits = self._forward(batch.kv, last, pos, batch.routing, all_logits=False)  # (B, V)
        except Exception as exc:  # noqa: BLE001 - the shared forward: its rows fail, the engine goes on
            logger.exception("decode forward over %d rows failed", len(batch))
            failure = Failure(FailureKind.MODEL_ERROR, describe(exc))
            for req in {id(s.req): s.req for s in batch.rows}.values():
                self.end(req, "error", failure)
            batch.clear()
            return
        self.advance(batch.rows, logits)
        self.drop_finished()

    def drop_finished(self) -> None:
        self.batch.leave([s for s in self.batch.rows if s.finished])

    # ------------------------------------------------------------------ one token per row
    def advance(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        """Pick one token per row (logits (B, V), raw), stream it, finish rows that are done.

        Each row's faults stay in that row: its request fails (every sequence of it), the others
        are untouched.
        """
        tokens = pick_tokens(logits, seqs)
        for i, (seq, token) in enumerate(zip(seqs, tokens)):
            if seq.finished:  # a sibling sequence failed the request earlier in this loop
                continue
            if isinstance(token, BaseException):
                self.end(seq.req, "error", Failure(FailureKind.ROW_FAILED, describe(token)))
                continue
            try:
                self._accept(seq, token, logits[i])
            except Exception as exc:  # noqa: BLE001 - its detokenizer, stop strings, constraint, logprobs
                logger.warning("request %s failed in its own row: %s", seq.req.request_id, describe(exc))
                self.end(seq.req, "error", Failure(FailureKind.ROW_FAILED, describe(exc)))

    def _accept(self, seq: Sequence, token: int, raw: torch.Tensor) -> None:
        req = seq.req
        lp: list[TokenLogprob] | None = None
        if seq.params.logprobs is not None:
            lp = token_logprobs(raw.unsqueeze(0), [token], seq.params.logprobs)  # raw: (V,) -> (1, V)
        seq.output_ids.append(token)
        self.counters["generated_tokens"] += 1
        done = False
        if seq.constraint is not None:
            seq.constraint.accept(token)
            done = bool(seq.constraint.is_finished())
        text = seq.detok.update(seq.output_ids)
        reason = None
        if token in req.stop_ids or seq.detok.stopped or done:
            reason = "stop"
        elif len(seq.output_ids) >= req.max_new:
            reason = "length"
        if reason is not None:
            text += seq.detok.flush() if not seq.detok.stopped else ""
        self._push(seq, [token], text, reason, None, lp)

    # ------------------------------------------------------------------ ending
    def _push(self, seq: Sequence, token_ids: list[int], text: str, reason: str | None, failure: Failure | None,
              lp: list[TokenLogprob] | None = None) -> None:
        req = seq.req
        prompt_lp = None
        if req.prompt_logprobs is not None and not seq.sent_prompt_logprobs:
            prompt_lp, seq.sent_prompt_logprobs = req.prompt_logprobs, True
        if reason is not None:
            seq.finished = True
        req.handle._push(RequestOutput(
            req.request_id, req.adapter, token_ids, text, finished=reason is not None, finish_reason=reason,
            prompt_tokens=len(req.prompt_ids), completion_tokens=len(seq.output_ids),
            error=failure.message if failure is not None and reason == "error" else None, index=seq.index,
            logprobs=lp, prompt_logprobs=prompt_lp, failure=failure))
        if reason is not None and all(s.finished for s in req.seqs) and not req.done:
            req.done = True
            self._retire(req)

    def end(self, req: Request, reason: str, failure: Failure | None = None) -> None:
        """End every unfinished sequence of ``req`` (abort, error); rows still in the batch are
        dropped by the caller (``drop_finished``) or by ``batch.clear``."""
        for seq in req.seqs:
            if seq.finished:
                continue
            text = ""
            if seq.detok is not None and not seq.detok.stopped:
                try:
                    text = seq.detok.flush()
                except Exception:  # noqa: BLE001 - a broken detokenizer must not stop the ending
                    text = ""
            self._push(seq, [], text, reason, failure)

    def cancel(self, req: Request) -> bool:
        """Abort ``req`` if it is prefilling or decoding here; False if it is not."""
        if req in self.prefilling:
            self.prefilling.remove(req)
            req.kv_part = None
        elif not any(s.req is req for s in self.batch.rows):
            return False
        self.end(req, "abort", ABORTED)
        self.drop_finished()
        return True

    def fail_everything(self, failure: Failure) -> list[Request]:
        """After an unexpected error in the step's own bookkeeping: end every request held here."""
        reqs = self.requests()
        for req in reqs:
            self.end(req, "error", failure)
        self.prefilling = []
        self.batch.clear()
        return reqs
