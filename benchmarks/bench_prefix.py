"""Prefix cache: time to first token of chat requests that share a system prompt, with vs without it.

Workload: 4 clients, one per adapter (ranks 8/16/32/64 on all 7 projections of SmolLM2-135M's shape),
each sending chat requests one after another: the same ~200-token system prompt, then a user message
of 8-32 tokens that differs every time, 8 new tokens each (greedy). With the cache a request prefills
only its user message (its adapter's first request fills the cache); without it, all of the prompt.
Both engines run on the same model in one process, rounds alternating (off, on, off, on, ...), and the
ratio of the TTFT medians is the figure; greedy outputs of the two are compared token for token.

    .venv/bin/python benchmarks/bench_prefix.py [--rounds 2] [--requests 8] [--threads 2] [--no-write]
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import build_base, make_peft_adapters, write_section  # noqa: E402

START, END = "<!-- bench_prefix:start -->", "<!-- bench_prefix:end -->"
SYSTEM_TOKENS = 200


def workload(seed: int, clients: int, per_client: int, vocab: int) -> tuple[list[int], list[list[list[int]]]]:
    rng = random.Random(seed)
    system = [rng.randrange(3, vocab) for _ in range(SYSTEM_TOKENS)]
    users = [[[rng.randrange(3, vocab) for _ in range(rng.randrange(8, 33))] for _ in range(per_client)]
             for _ in range(clients)]
    return system, users


def run_round(engine, adapters: list[str], system: list[int], users: list[list[list[int]]], max_tokens: int):
    """Closed loop: one thread per client, each request after the previous one finished. Returns the TTFT
    (seconds) of every request and the outputs keyed by (client, turn)."""
    from loramux.engine import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    ttft: list[float] = []
    outputs: dict[tuple[int, int], list[int]] = {}
    lock = threading.Lock()

    def client(c: int) -> None:
        for turn, user in enumerate(users[c]):
            handle = engine.submit(system + user, adapters[c], params)
            result = handle.result(timeout=600)
            with lock:
                ttft.append(handle.first_token_at - handle.submitted_at)
                outputs[(c, turn)] = result.token_ids

    threads = [threading.Thread(target=client, args=(c,)) for c in range(len(adapters))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return ttft, outputs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2, help="rounds per mode (alternating)")
    ap.add_argument("--requests", type=int, default=8, help="requests per client per round")
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch threads: {torch.get_num_threads()}", flush=True)

    from loramux import MultiLoraModel
    from loramux.engine import AdapterRegistry, Engine

    base = build_base()
    tmp = Path(tempfile.mkdtemp(prefix="bench_prefix_"))
    adapters = make_peft_adapters(base, tmp, 4)
    registry = AdapterRegistry()
    for name, path, _ in adapters:
        registry.register(name, path)
    names = [name for name, _, _ in adapters]
    model = MultiLoraModel(base)
    engines = {"off": Engine(model, registry=registry, max_running=8, prefix_cache_bytes=0).start(),
               "on": Engine(model, registry=registry, max_running=8).start()}
    vocab = base.config.vocab_size
    # warm-up (kernel, adapter loads, allocator) with another system prompt: not measured
    for engine in engines.values():
        warm_system, warm_users = workload(999, len(names), 2, vocab)
        run_round(engine, names, warm_system, warm_users, args.max_tokens)
    ttft: dict[str, list[float]] = {"off": [], "on": []}
    medians: dict[str, list[float]] = {"off": [], "on": []}
    mismatches = 0
    for r in range(args.rounds):
        system, users = workload(r, len(names), args.requests, vocab)
        outs = {}
        for mode in ("off", "on"):
            t, outs[mode] = run_round(engines[mode], names, system, users, args.max_tokens)
            ttft[mode] += t
            medians[mode].append(statistics.median(t))
            print(f"round {r} cache {mode:3s}: TTFT p50 {statistics.median(t) * 1e3:7.1f} ms over {len(t)} requests",
                  flush=True)
        mismatches += sum(outs["off"][k] != outs["on"][k] for k in outs["off"])
    stats = engines["on"].stats()
    for engine in engines.values():
        engine.shutdown()
    p50 = {m: statistics.median(v) for m, v in ttft.items()}
    p90 = {m: statistics.quantiles(v, n=10)[-1] for m, v in ttft.items()}
    ratio = p50["off"] / p50["on"]
    rounds = ", ".join(f"{a / b:.1f}" for a, b in zip(medians["off"], medians["on"]))
    lines = [
        START,
        "## Prefix cache: TTFT of chat requests sharing a system prompt",
        "",
        f"`.venv/bin/python benchmarks/bench_prefix.py --rounds {args.rounds} --requests {args.requests}` "
        f"({time.strftime('%Y-%m-%d')}, {torch.get_num_threads()} threads): SmolLM2-135M shape, 4 adapters "
        f"(r 8/16/32/64, all 7 projections), 4 closed-loop clients (one per adapter), {SYSTEM_TOKENS}-token system "
        f"prompt + 8-32-token user message, {args.max_tokens} greedy tokens; the two engines share the model and "
        "run alternately in one process.",
        "",
        "| prefix cache | TTFT p50 | TTFT p90 |",
        "|---|---|---|",
        f"| off | {p50['off'] * 1e3:.0f} ms | {p90['off'] * 1e3:.0f} ms |",
        f"| on | {p50['on'] * 1e3:.0f} ms | {p90['on'] * 1e3:.0f} ms |",
        "",
        f"- TTFT p50 off/on: **{ratio:.1f}x** (target >= 3x; per round {rounds}).",
        f"- Cache (on): {stats['prefix_cache_hit_tokens']} prompt tokens reused in {stats['prefix_cache_hits']} hits "
        f"of {stats['prefix_cache_queries']} lookups, {stats['prefix_cache_entries']} entries, "
        f"{stats['prefix_cache_bytes'] / 2**20:.0f} MiB.",
        f"- Greedy outputs off vs on: {mismatches} of {args.rounds * len(names) * args.requests} requests differ.",
        END,
    ]
    print("\n".join(lines[1:-1]))
    if not args.no_write:
        write_section(START, END, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
