"""The serving benchmark's workload and its latency statistics (``bench_serve.py``)."""
from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Job:
    arrival: float  # seconds after the start
    prompt: list[int]
    adapter: str | None


def make_workload(names: list[str] | None, n: int, rate: float, seed: int) -> list[Job]:
    """Poisson arrivals (``rate`` per second), prompts of 32-256 tokens, adapters Zipf-like over ``names``."""
    rng = random.Random(seed)
    weights = [1.0 / (i + 1) for i in range(len(names))] if names else None
    t, jobs = 0.0, []
    for _ in range(n):
        prompt = [rng.randrange(3, 49152) for _ in range(rng.randint(32, 256))]
        jobs.append(Job(t, prompt, rng.choices(names, weights)[0] if names else None))
        t += rng.expovariate(rate)
    return jobs


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def summarize(arrivals: list[float], token_times: list[list[float]], t0: float) -> dict:
    """Throughput, TTFT and ITL from per-request token timestamps (absolute, perf_counter)."""
    tokens = sum(len(ts) for ts in token_times)
    wall = max(ts[-1] for ts in token_times) - t0
    ttft = [ts[0] - (t0 + a) for a, ts in zip(arrivals, token_times)]
    itl = [b - a for ts in token_times for a, b in zip(ts, ts[1:])]
    return {"tokens": tokens, "wall": wall, "tps": tokens / wall, "ttft50": pct(ttft, 0.5), "ttft99": pct(ttft, 0.99),
            "itl50": pct(itl, 0.5), "itl99": pct(itl, 0.99)}
