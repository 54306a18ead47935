"""Adapter-affinity routing vs Ray Serve's default routing, on this machine, in one run.

``loramux serve --replicas 2`` as a Serve app (``loramux.ray.build_app``), the embedded default base
model (SmolLM2-135M) on each replica, 16 PEFT adapters (ranks 8/16/32/64 on all 7 projections, as
in the other benchmarks), at most 4 resident per replica (``max_loaded_adapters``), 1 thread per
replica. The same seeded workload (Zipf s=1 over the 16 adapters, ``--clients`` concurrent,
``--max-tokens`` each, EOS ignored) runs once through each router:

- affinity: ``AdapterAffinityRouter`` (loramux/ray/router.py; holders first, bounded load);
- pow2: Ray's default ``PowerOfTwoChoicesRequestRouter``, and the ingress sends no multiplexed
  model id (with one, Ray's default router also prefers replicas reporting the adapter), i.e. power
  of two choices by queue length only.

Reports adapter loads (and evictions) per 100 requests from the replicas' own counters, throughput
(generated tokens/s, requests/s), and how concentrated each adapter's traffic is. The machine is
shared: read the ratio of the two rows, not the absolute figures. Writes its section of BENCHMARKS.md.

    python benchmarks/bench_ray.py                 # ~5 min here
    python benchmarks/bench_ray.py --requests 32   # a quicker look
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import os
import random
import socket
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
ROOT = Path(__file__).resolve().parent.parent
START, END = "<!-- bench_ray:start -->", "<!-- bench_ray:end -->"
PROMPTS = ["Summarize the plot of a detective story in two sentences.",
           "Write a SQL query that lists the ten most recent orders.",
           "Extract the name and city: Maria is 34 and lives in Lisbon.",
           "Explain what a LoRA adapter is to a new engineer."]


def zipf_names(n_adapters: int, count: int, s: float, seed: int) -> list[str]:
    rng = random.Random(seed)
    weights = [1.0 / (k + 1) ** s for k in range(n_adapters)]
    return [f"a{i}" for i in rng.choices(range(n_adapters), weights=weights, k=count)]


async def drive(url: str, names: list[str], clients: int, max_tokens: int) -> dict:
    queue: asyncio.Queue = asyncio.Queue()
    for i, name in enumerate(names):
        queue.put_nowait((i, name))
    served: dict[str, list[str]] = collections.defaultdict(list)
    tokens, errors = 0, 0

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal tokens, errors
        while not queue.empty():
            i, name = queue.get_nowait()
            body = {"model": name, "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens, "temperature": 0,
                    "ignore_eos": True}
            r = await http.post(url + "/v1/completions", json=body, timeout=600)
            if r.status_code != 200:
                errors += 1
                if errors <= 3:
                    print(f"error {r.status_code}: {r.text[:300]}", file=sys.stderr)
                continue
            tokens += r.json()["usage"]["completion_tokens"]
            served[name].append(r.headers["x-loramux-replica"])

    start = time.perf_counter()
    async with httpx.AsyncClient() as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    wall = time.perf_counter() - start
    return {"wall": wall, "tokens": tokens, "errors": errors, "served": served}


def replica_counters(url: str) -> dict[str, dict]:
    return {row["replica"]: row for row in httpx.get(url + "/replicas", timeout=30).json()["data"]}


def run_policy(serve, build_app, url: str, options: dict, affinity: bool, names: list[str], args) -> dict:
    app = build_app(options, replicas=2, replica_cpus=1, affinity=affinity)
    serve.run(app, name="bench", route_prefix="/")
    deadline = time.monotonic() + 300
    while httpx.get(url + "/health", timeout=10).status_code != 200:
        if time.monotonic() > deadline:
            raise RuntimeError("the app did not come up")
        time.sleep(0.5)
    # warm-up on the base model only (no adapter loaded): each replica runs its first steps
    asyncio.run(drive(url, ["SmolLM2-135M-Instruct"] * 4, 4, 2))
    before = replica_counters(url)
    result = asyncio.run(drive(url, names, args.clients, args.max_tokens))
    after = replica_counters(url)
    serve.delete("bench")
    loads = sum(after[r].get("loads", 0) - before.get(r, {}).get("loads", 0) for r in after)
    evictions = sum(after[r].get("evictions", 0) - before.get(r, {}).get("evictions", 0) for r in after)
    # requests that went to their adapter's busiest replica, over all requests (1.0: each adapter on one replica)
    on_top = sum(collections.Counter(v).most_common(1)[0][1] for v in result["served"].values())
    n = len(names)
    return {"policy": "affinity" if affinity else "pow2 (Ray default)", "requests": n, "errors": result["errors"],
            "loads_per_100": 100 * loads / n, "evictions_per_100": 100 * evictions / n,
            "tok_s": result["tokens"] / result["wall"], "req_s": n / result["wall"], "wall": result["wall"],
            "top_share": on_top / max(1, sum(len(v) for v in result["served"].values())),
            "replicas_used": len(after)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--adapters", type=int, default=16)
    p.add_argument("--resident", type=int, default=4, help="max_loaded_adapters per replica")
    p.add_argument("--requests", type=int, default=96)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--zipf", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    args = p.parse_args()

    import ray
    import torch
    from ray import serve

    from bench_common import build_base, make_peft_adapters, write_section
    from loramux.ray import build_app

    torch.set_num_threads(1)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    tmp = Path(tempfile.mkdtemp(prefix="bench_ray_"))
    t0 = time.perf_counter()
    make_peft_adapters(build_base(), tmp, args.adapters)
    print(f"{args.adapters} adapters written in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    options = {"adapter_root": [str(tmp)], "no_bundled_adapters": True, "threads": 1,
               "max_loaded_adapters": args.resident, "max_running": 16}
    names = zipf_names(args.adapters, args.requests, args.zipf, args.seed)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    rows = []
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        url = f"http://127.0.0.1:{port}"
        for affinity in (True, False):
            rows.append(run_policy(serve, build_app, url, options, affinity, names, args))
            print(rows[-1], file=sys.stderr)
    finally:
        serve.shutdown()
        ray.shutdown()
    load1 = os.getloadavg()[0]
    cmd = "python benchmarks/bench_ray.py " + " ".join(sys.argv[1:])
    lines = [START, "## Scale-out: `loramux serve --replicas 2` on Ray Serve, affinity vs default routing", "",
             f"Command: `{cmd.strip()}`; run {time.strftime('%Y-%m-%d %H:%M')}; ray 2.60.0, torch "
             f"{torch.__version__}; 2 replicas x 1 thread on this 2-core machine; 1-min load average {load1:.1f} at "
             "the end (other users of the machine).", "",
             f"Workload: the embedded SmolLM2-135M on each replica; {args.adapters} PEFT adapters (ranks 8/16/32/64, all "
             f"7 projections), at most {args.resident} resident per replica; {args.requests} requests, Zipf s={args.zipf} "
             f"over the adapters (seeded, the same sequence for both), {args.clients} concurrent clients, "
             f"{args.max_tokens} tokens each (EOS ignored). Loads and evictions are the replicas' own counters. "
             "One run each, affinity first; compare the two rows, not absolute figures.", "",
             "| router | adapter loads / 100 requests | evictions / 100 | generated tok/s | requests/s | requests on their adapter's busiest replica | errors |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['policy']} | {r['loads_per_100']:.1f} | {r['evictions_per_100']:.1f} | {r['tok_s']:.1f} | "
                     f"{r['req_s']:.2f} | {r['top_share']:.0%} | {r['errors']} |")
    if len(rows) == 2 and rows[1]["loads_per_100"]:
        lines += ["", f"Affinity / default: loads {rows[0]['loads_per_100'] / rows[1]['loads_per_100']:.2f}x, "
                      f"throughput {rows[0]['tok_s'] / rows[1]['tok_s']:.2f}x."]
    lines.append(END)
    section = "\n".join(lines) + "\n"
    print(section)
    if not args.no_write:
        write_section(START, END, section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
