"""Structured outputs (issue 12): what a grammar mask costs per token, against a decode step.

(A) The mask alone, on the default model's tokenizer (SmolLM2-135M, 49,152 tokens): per generated
    token, compute the next-token mask, turn it into the (V,) bool tensor the engine takes, accept
    the token; over the tokens of a fixed JSON answer. llguidance (what loramux uses) and, when it
    is installed, xgrammar 0.2.8 side by side; plus tokenizer-wrap and schema-compile times.
(B) The engine end to end on the default model: 8 rows, 48 tokens each (EOS ignored), greedy or seeded
    sampled (``--sampling``), free vs every row constrained by a schema long enough never to complete vs
    half and half; rounds alternate, median wall and process CPU time per configuration (CPU time is
    steadier on a shared machine). The overhead is constrained / free - 1 (target: under 10% of a decode
    step).
(C) The engine's token pick alone (``engine.sampling.pick_tokens`` on 8 x 49,152 logits), all rows free vs
    all constrained (mask, masked pick, accept), greedy or sampled: the per-step cost a constraint adds,
    without the noise of the forward pass.

    .venv/bin/python benchmarks/bench_structured.py [--threads 2] [--rounds 3] [--parts ABC]
        [--sampling greedy|sampled|both]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                           "city": {"type": "string"}, "tags": {"type": "array", "items": {"type": "string"}}},
          "required": ["name", "age", "city", "tags"], "additionalProperties": False}
ANSWER = json.dumps({"name": "Maria Lopes", "age": 34, "city": "Lisbon", "tags": ["engineer", "runner", "reader"]},
                    separators=(",", ":"))
LONG = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 60, "maxItems": 60}


def bench_llguidance(tok, vocab: int, ids: list[int], reps: int) -> dict[str, float]:
    import llguidance
    import llguidance.hf

    from loramux.server.structured import GrammarConstraint

    t0 = time.perf_counter()
    lltok = llguidance.hf.from_tokenizer(tok, n_vocab=vocab, eos_token=tok.eos_token_id)
    t1 = time.perf_counter()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA, overrides={"whitespace_flexible": False})
    llguidance.LLMatcher(lltok, grammar)
    t2 = time.perf_counter()
    times = []
    for _ in range(reps):
        c = GrammarConstraint(llguidance.LLMatcher(lltok, grammar))
        for t in ids:
            a = time.perf_counter()
            mask = c.allowed(vocab)
            assert mask[t], "the answer's token must be allowed"
            c.accept(t)
            times.append(time.perf_counter() - a)
    return {"wrap_s": t1 - t0, "compile_s": t2 - t1, "per_token_us": 1e6 * statistics.median(times),
            "p99_us": 1e6 * sorted(times)[int(0.99 * len(times))]}


def bench_xgrammar(tok, vocab: int, ids: list[int], reps: int) -> dict[str, float] | None:
    try:
        import xgrammar as xgr
    except ImportError:
        return None
    import numpy as np

    t0 = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab)
    compiler = xgr.GrammarCompiler(info, max_threads=1)
    t1 = time.perf_counter()
    compiled = compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False)
    t2 = time.perf_counter()
    bitmask = xgr.allocate_token_bitmask(1, vocab)
    times = []
    for _ in range(reps):
        m = xgr.GrammarMatcher(compiled)
        for t in ids:
            a = time.perf_counter()
            m.fill_next_token_bitmask(bitmask)
            packed = bitmask[0].numpy().view(np.uint8)  # same unpacking as GrammarConstraint.allowed
            mask = torch.from_numpy(np.unpackbits(packed, bitorder="little").view(np.bool_))[:vocab]  # (V,)
            assert mask[t] == bool(m.accept_token(t)), "the mask must allow exactly what the matcher accepts"
            times.append(time.perf_counter() - a)
    return {"wrap_s": t1 - t0, "compile_s": t2 - t1, "per_token_us": 1e6 * statistics.median(times),
            "p99_us": 1e6 * sorted(times)[int(0.99 * len(times))]}


SAMPLED = dict(temperature=0.8, top_p=0.95)  # the sampled mode of (B) and (C); seeded per row


def _params(sampling: str, i: int, **kw):
    from loramux.engine import SamplingParams

    if sampling == "greedy":
        return SamplingParams(temperature=0, **kw)
    return SamplingParams(seed=1000 + i, **SAMPLED, **kw)


def bench_pick(tok, vocab: int, sampling: str, rounds: int, rows: int = 8, steps: int = 30) -> dict[str, list]:
    """(C) The engine's per-step token pick (``pick_tokens`` on (B, V) logits) with every row free vs
    every row constrained (mask + masked pick + accept): the whole per-step cost a constraint adds,
    without the forward pass's noise. Rounds alternate; (wall, CPU) seconds per step each round."""
    from types import SimpleNamespace

    from loramux.engine.sampling import make_generator, pick_tokens
    from loramux.server import schemas
    from loramux.server.structured import StructuredOutputs

    structured = StructuredOutputs(tok, vocab)
    fmt = schemas.ResponseFormat.model_validate({"type": "json_schema", "json_schema": {"name": "x", "schema": LONG}})
    factory = structured.factory(fmt)
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(steps, rows, vocab, generator=gen)  # (steps, B, V)
    out: dict[str, list] = {"free": [], "constrained": []}
    for rnd in range(rounds + 1):  # round 0 is a warm-up
        for name in ("free", "constrained"):
            seqs = []
            for i in range(rows):
                params = _params(sampling, i, max_tokens=64)
                seqs.append(SimpleNamespace(params=params, constraint=factory() if name == "constrained" else None,
                                            generator=None if params.greedy else make_generator(params.seed, logits.device)))
            start, cpu = time.perf_counter(), time.process_time()
            for step in range(steps):
                picks = pick_tokens(logits[step], seqs)
                for seq, token in zip(seqs, picks):
                    assert isinstance(token, int), token
                    if seq.constraint is not None:
                        seq.constraint.accept(token)
            if rnd:
                out[name].append(((time.perf_counter() - start) / steps, (time.process_time() - cpu) / steps))
    return out


class _EngineClock:
    """The engine thread's own CPU time (``time.thread_time``, blind to the other users of the machine and to
    other threads): in decode steps, in their ``pick_tokens`` (which asks each constraint for its mask) and in
    the constraints' ``accept``/``is_finished``. What constrained rows add to a step is then measured inside
    the step itself, not as the difference of two noisy end-to-end runs. Meant for ``--threads 1`` (at 2 the
    OpenMP worker's share of a step is not in this thread's time)."""

    def __init__(self) -> None:
        self.decode = self.pick = self.accept = 0.0
        self.steps, self._in_decode = 0, False

    def install(self) -> None:
        import loramux.engine.step as step_mod  # the benchmark wraps the engine's own calls

        real_pick, real_decode, clock = step_mod.pick_tokens, step_mod.Stepper.decode, self

        def pick(logits, seqs):
            start = time.thread_time()
            out = real_pick(logits, seqs)
            if clock._in_decode:  # not the first token, picked at the end of a prefill
                clock.pick += time.thread_time() - start
            return out

        def decode(stepper) -> None:
            if not stepper.batch:
                return real_decode(stepper)
            clock._in_decode, start = True, time.thread_time()
            try:
                return real_decode(stepper)
            finally:
                clock.decode += time.thread_time() - start
                clock.steps, clock._in_decode = clock.steps + 1, False

        step_mod.pick_tokens, step_mod.Stepper.decode = pick, decode

    def timed(self, factory):
        """A constraint factory whose constraints count their accept/is_finished time."""
        clock = self

        class Timed:
            def __init__(self) -> None:
                self.inner = factory()

            def allowed(self, vocab_size: int):
                return self.inner.allowed(vocab_size)  # counted in pick_tokens

            def accept(self, token_id: int) -> None:
                start = time.thread_time()
                self.inner.accept(token_id)
                clock.accept += time.thread_time() - start

            def is_finished(self) -> bool:
                start = time.thread_time()
                done = self.inner.is_finished()
                clock.accept += time.thread_time() - start
                return done

        return Timed

    def per_step(self) -> tuple[float, float, float]:
        """(decode, pick, accept) seconds per decode step since the last call; resets."""
        steps = max(self.steps, 1)
        out = (self.decode / steps, self.pick / steps, self.accept / steps)
        self.decode = self.pick = self.accept = 0.0
        self.steps = 0
        return out


def bench_engine(rounds: int, sampling: str) -> dict[str, list[tuple[float, ...]]]:
    """(B): per round and configuration (wall s, process CPU s, then per decode step the engine thread's
    CPU s in the step, in pick_tokens, in the constraints' accept/is_finished)."""
    from loramux import MultiLoraModel
    from loramux.base import load_base
    from loramux.engine import Engine
    from loramux.server import schemas
    from loramux.server.structured import StructuredOutputs

    clock = _EngineClock()
    clock.install()
    model, tok = load_base(None)
    engine = Engine(MultiLoraModel(model), tok, max_running=8).start()
    structured = StructuredOutputs(tok, model.config.vocab_size)
    fmt = schemas.ResponseFormat.model_validate({"type": "json_schema", "json_schema": {"name": "x", "schema": LONG}})
    factory = clock.timed(structured.factory(fmt))
    prompts = [f"List sixty digits, as a JSON array, for request {i}:" for i in range(8)]

    def run(constrained: int) -> tuple[float, ...]:
        clock.per_step()
        start, cpu = time.perf_counter(), time.process_time()
        handles = [engine.submit(p, params=_params(sampling, i, max_tokens=48, ignore_eos=True,
                                                   constraint=factory if i < constrained else None))
                   for i, p in enumerate(prompts)]
        outs = [h.result(timeout=600) for h in handles]
        assert all(o.completion_tokens == 48 for o in outs), [o.finish_reason for o in outs]
        # wall, CPU seconds of all threads, then the engine thread's per-step figures
        return (time.perf_counter() - start, time.process_time() - cpu, *clock.per_step())

    run(0), run(8)  # warm-up
    results: dict[str, list[tuple[float, ...]]] = {"free": [], "half": [], "all": []}
    for _ in range(rounds):
        for name, k in (("free", 0), ("all", 8), ("half", 4)):
            results[name].append(run(k))
    engine.shutdown()
    return results


def _report_steps(label: str, res: dict[str, list[tuple[float, ...]]]) -> None:
    """The engine thread's per-step figures of (B) and what the constrained rows add to a free step."""
    med = {k: [statistics.median(x[j] for x in v) for j in (2, 3, 4)] for k, v in res.items()}
    for k, (step, pick, acc) in med.items():
        print(f"{label} {k:>4}: engine thread per decode step {1e3 * step:.2f} ms, pick_tokens {1e3 * pick:.3f} ms, "
              f"constraint accept/is_finished {1e3 * acc:.3f} ms")
    free_step, free_pick = med["free"][0], med["free"][1]
    for k in ("half", "all"):
        added = med[k][1] + med[k][2] - free_pick
        print(f"{label} {k}: constrained rows add {1e3 * added:.3f} ms per step = {100 * added / free_step:+.2f}% of "
              f"the free step (whole step {100 * (med[k][0] / free_step - 1):+.1f}%)")


def _report(label: str, res: dict[str, list[tuple[float, float]]], unit: float, fmt: str) -> None:
    for j, what in ((0, "wall"), (1, "CPU")):
        med = {k: statistics.median(x[j] for x in v) for k, v in res.items()}
        for k, v in res.items():
            print(f"{label} {k:>11}: {what} median {fmt.format(unit * med[k])} "
                  f"(rounds {', '.join(fmt.format(unit * x[j]) for x in v)})")
        free = med["free"]
        print(f"{label} {what} overhead: " + ", ".join(f"{k} {100 * (m / free - 1):+.1f}%" for k, m in med.items()
                                                        if k != "free"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds of (B) and (C) after a warm-up")
    ap.add_argument("--reps", type=int, default=20, help="repetitions of the answer in (A)")
    ap.add_argument("--parts", default="ABC", help="which parts to run, e.g. BC (default ABC)")
    ap.add_argument("--sampling", default="greedy", choices=("greedy", "sampled", "both"),
                    help=f"(B) and (C): greedy rows, seeded sampled rows ({SAMPLED}), or both")
    ap.add_argument("--no-engine", action="store_true", help="same as --parts AC")
    args = ap.parse_args()
    parts = set(args.parts.upper()) - ({"B"} if args.no_engine else set())
    modes = ("greedy", "sampled") if args.sampling == "both" else (args.sampling,)
    torch.set_num_threads(args.threads)
    print(f"torch threads: {torch.get_num_threads()}, parts {''.join(sorted(parts))}, sampling {', '.join(modes)}")
    from loramux.base import load_base

    _, tok = load_base(None)
    vocab = 49152
    ids = list(tok(ANSWER, add_special_tokens=False)["input_ids"])
    print(f"tokenizer vocab {len(tok)}, mask length {vocab}, answer {len(ids)} tokens")
    if "A" in parts:
        for name, fn in (("llguidance", bench_llguidance), ("xgrammar", bench_xgrammar)):
            r = fn(tok, vocab, ids, args.reps)
            if r is None:
                print(f"{name}: not installed")
                continue
            print(f"{name}: wrap tokenizer {r['wrap_s']:.2f} s, compile schema {1e3 * r['compile_s']:.1f} ms, "
                  f"mask+accept per token median {r['per_token_us']:.1f} us (p99 {r['p99_us']:.1f} us)")
    for mode in modes:
        if "C" in parts:
            _report(f"(C) pick_tokens 8 rows {mode}, ms/step,", bench_pick(tok, vocab, mode, args.rounds), 1e3,
                    "{:.2f}")
        if "B" in parts:
            res = bench_engine(args.rounds, mode)
            _report(f"(B) engine 8 rows x 48 tokens {mode}, s,", res, 1.0, "{:.2f}")
            _report_steps(f"(B) {mode}", res)


if __name__ == "__main__":
    main()
