"""Adapter-affinity routing at internet scale, simulated (no Ray; seconds per configuration).

Runs the same policy functions as ``loramux/ray/router.py`` (``loramux.ray.routing``) over 64-1,024
replicas and 10,000-100,000 adapters with Zipf popularity, against Ray's default power-of-two-choices
and against plain hashing (affinity without a load bound). Prints a markdown table, writes a plot.

Model of one replica (defaults from figures measured on this machine, see BENCHMARKS.md):
- ``--slots`` requests run at once (the engine's --max-running, 16), each for ``--service`` seconds
  (64 tokens at the B16 decode step of SmolLM2-135M: ~6 s); more wait in FIFO order;
- ``--capacity`` adapters resident (--max-loaded-adapters, 32), LRU;
- one loader thread: a request whose adapter is not resident waits for its load, ``--load`` seconds
  each (0.19 s: 9.5 s for 49 loads in the 2,000-adapter serving run), loads one after another.
Arrivals are Poisson at ``--utilization`` of the fleet's capacity. The first ``--warmup`` share of
requests fills the caches and is not counted. Routers see exact in-flight counts (one router).

    python benchmarks/sim_routing.py                      # the table in BENCHMARKS.md (~1 min)
    python benchmarks/sim_routing.py --replicas 64 --adapters 10000 --quick
"""
from __future__ import annotations

import argparse
import heapq
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
from loramux.ray.routing import ReplicaState, Residency, rank_replicas  # noqa: E402

POLICIES = ("affinity", "pow2", "hash")


class Replica:
    __slots__ = ("slots", "finishes", "loader_free")

    def __init__(self, n_slots: int) -> None:
        self.slots = [0.0] * n_slots  # when each slot is next free (a heap)
        self.finishes: list[float] = []  # finish times of requests sent here (a heap)
        self.loader_free = 0.0

    def in_flight(self, now: float) -> int:
        f = self.finishes
        while f and f[0] <= now:
            heapq.heappop(f)
        return len(f)


def zipf_sampler(n: int, s: float, rng: np.random.Generator):
    weights = 1.0 / np.arange(1, n + 1) ** s
    cdf = np.cumsum(weights / weights.sum())
    perm = rng.permutation(n)  # popularity rank -> adapter id, so ids say nothing about popularity

    def draw(k: int) -> np.ndarray:
        return perm[np.minimum(np.searchsorted(cdf, rng.random(k)), n - 1)]

    return draw


def simulate(policy: str, n_replicas: int, n_adapters: int, *, requests: int, zipf: float, capacity: int,
             slots: int, service: float, load: float, utilization: float, warmup: float, seed: int,
             holder_sample: int = 4) -> dict:
    rng, prng = np.random.default_rng(seed), random.Random(seed)
    rate = utilization * n_replicas * slots / service  # requests per second for the whole fleet
    arrivals = np.cumsum(rng.exponential(1.0 / rate, requests))
    adapters = zipf_sampler(n_adapters, zipf, rng)(requests)
    replicas = [Replica(slots) for _ in range(n_replicas)]
    homes = rng.integers(0, n_replicas, size=(n_adapters, 3))
    residency = Residency(capacity)
    all_finishes: list[float] = []  # every in-flight request's finish time: the fleet's total in flight
    counted_from = int(requests * warmup)
    waits, hits, loads, holders_hot = [], 0, 0, 0
    hot = int(np.bincount(adapters).argmax())
    started = time.perf_counter()
    for i in range(requests):
        now, a = float(arrivals[i]), int(adapters[i])
        name = str(a)
        while all_finishes and all_finishes[0] <= now:
            heapq.heappop(all_finishes)
        if policy == "pow2":
            x, y = prng.randrange(n_replicas), prng.randrange(n_replicas)
            r = x if replicas[x].in_flight(now) <= replicas[y].in_flight(now) else y
        elif policy == "hash":
            r = a % n_replicas
        else:
            held = residency.holders(name)
            # at this scale a router looks at a few sampled holders (a hot adapter is held by dozens), the
            # adapter's first few replicas in its hash order (its homes; a per-adapter sample stands in for
            # the rendezvous order over all replicas) and one random replica; loramux/ray's router, with few
            # replicas, ranks them all
            cands = set(held if len(held) <= holder_sample else prng.sample(list(held), holder_sample))
            cands.update(homes[a].tolist())
            cands.add(prng.randrange(n_replicas))
            view = [ReplicaState(c, replicas[c].in_flight(now), residency.holds(c, name)) for c in cands]
            r = rank_replicas(name, view, total_in_flight=len(all_finishes), n_replicas=n_replicas)[0][0]
        rep = replicas[r]
        hit = residency.holds(r, name)
        residency.touch(r, name)
        ready = now
        if not hit:
            rep.loader_free = max(rep.loader_free, now) + load
            ready = rep.loader_free
        slot_free = heapq.heappop(rep.slots)
        start = max(ready, slot_free)
        finish = start + service
        heapq.heappush(rep.slots, finish)
        heapq.heappush(rep.finishes, finish)
        heapq.heappush(all_finishes, finish)
        if i >= counted_from:
            waits.append(start - now)
            hits += hit
            loads += not hit
        if a == hot:
            holders_hot = max(holders_hot, len(residency.holders(name)))
    span = float(arrivals[-1] - arrivals[counted_from])
    counted = requests - counted_from
    w = np.array(waits)
    return {"policy": policy, "replicas": n_replicas, "adapters": n_adapters, "requests": requests,
            "hit_rate": hits / counted, "loads_per_s": loads / span, "loads_per_s_per_replica": loads / span / n_replicas,
            "loader_busy": loads * load / span / n_replicas, "p50_wait_s": float(np.percentile(w, 50)),
            "p99_wait_s": float(np.percentile(w, 99)), "hot_share": float(np.mean(adapters == hot)),
            "hot_holders": holders_hot, "sim_seconds": time.perf_counter() - started}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    styles = {"affinity": "-o", "pow2": "--s", "hash": ":^"}
    for n_adapters in sorted({r["adapters"] for r in rows}):
        for policy in POLICIES:
            sel = sorted((r for r in rows if r["adapters"] == n_adapters and r["policy"] == policy),
                         key=lambda r: r["replicas"])
            if not sel:
                continue
            label = f"{policy}, {n_adapters:,} adapters"
            xs = [r["replicas"] for r in sel]
            axes[0].plot(xs, [r["hit_rate"] for r in sel], styles[policy], label=label)
            axes[1].plot(xs, [r["loader_busy"] for r in sel], styles[policy], label=label)
            axes[2].plot(xs, [max(r["p99_wait_s"], 1e-3) for r in sel], styles[policy], label=label)
    axes[0].set_ylabel("adapter cache hit rate")
    axes[1].set_ylabel("loader busy share per replica (loads/s x load time)")
    axes[2].set_ylabel("p99 queueing before the first token (s)")
    axes[2].set_yscale("log")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("replicas")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("Routing many LoRA adapters over many replicas (simulated; benchmarks/sim_routing.py)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--replicas", default="64,256,1024")
    p.add_argument("--adapters", default="10000,100000")
    p.add_argument("--policies", default=",".join(POLICIES))
    p.add_argument("--requests-per-replica", type=int, default=120)
    p.add_argument("--zipf", type=float, default=1.0)
    p.add_argument("--capacity", type=int, default=32)
    p.add_argument("--slots", type=int, default=16)
    p.add_argument("--service", type=float, default=6.0)
    p.add_argument("--load", type=float, default=0.19)
    p.add_argument("--utilization", type=float, default=0.7)
    p.add_argument("--warmup", type=float, default=0.4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--holder-sample", type=int, default=4, help="holders the affinity router looks at per request")
    p.add_argument("--quick", action="store_true", help="30 requests per replica")
    p.add_argument("--plot", default=str(Path(__file__).with_name("sim_routing.png")))
    p.add_argument("--json", default=None)
    a = p.parse_args()
    per = 30 if a.quick else a.requests_per_replica
    rows = []
    t0 = time.perf_counter()
    for n_adapters in [int(x) for x in a.adapters.split(",")]:
        for n_replicas in [int(x) for x in a.replicas.split(",")]:
            for policy in a.policies.split(","):
                rows.append(simulate(policy, n_replicas, n_adapters, requests=per * n_replicas, zipf=a.zipf,
                                     capacity=a.capacity, slots=a.slots, service=a.service, load=a.load,
                                     utilization=a.utilization, warmup=a.warmup, seed=a.seed,
                                     holder_sample=a.holder_sample))
                r = rows[-1]
                print(f"  {policy:8s} R={n_replicas:5d} A={n_adapters:6d}: hit {r['hit_rate']:.3f}, "
                      f"p99 wait {r['p99_wait_s']:.2f} s ({r['sim_seconds']:.1f} s)", file=sys.stderr)
    print(f"python benchmarks/sim_routing.py {' '.join(sys.argv[1:])}".rstrip())
    print(f"zipf s={a.zipf}, capacity {a.capacity}/replica, {a.slots} slots x {a.service} s/request, load {a.load} s "
          f"(serial), utilization {a.utilization}, {per} requests/replica ({a.warmup:.0%} warm-up); "
          f"{time.perf_counter() - t0:.0f} s in all\n")
    print("| adapters | replicas | policy | hit rate | loads/s (fleet) | loader busy/replica | p50 wait | p99 wait | hottest adapter: share, replicas holding it |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['adapters']:,} | {r['replicas']} | {r['policy']} | {r['hit_rate']:.3f} | {r['loads_per_s']:.1f} | "
              f"{r['loader_busy']:.0%} | {r['p50_wait_s']:.2f} s | {r['p99_wait_s']:.2f} s | "
              f"{r['hot_share']:.1%}, {r['hot_holders']} |")
    if a.plot:
        plot(rows, Path(a.plot))
        print(f"\nplot: {a.plot}")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
