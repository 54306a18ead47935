"""Load test of ``loramux serve``: many concurrent streaming clients over many adapters, on loopback.

Starts the server in a subprocess on 127.0.0.1 (a free port), with ``--adapters`` generated PEFT
adapters (random non-zero weights, ranks 8/16 on q/v/o projections) under one ``--adapter-root``,
fewer resident slots than adapters so the cache loads and evicts under load. Then:

1. warm-up: one short request per adapter (every adapter has been loaded once);
2. RSS of the server process ("before");
3. ``--clients`` concurrent clients issue ``--requests`` streaming chat/completion requests in
   total (adapters drawn Zipf-like, seeded), each ``--max-tokens`` long (``ignore_eos``), until
   done or ``--time-limit`` seconds have passed;
4. RSS again ("after"), then the same workload a second time and RSS ("after x2"): a server that
   leaks grows between the two; between and after the server rounds, the same workload runs
   straight into an Engine in this process (no HTTP, the server idle): the machine is shared and
   noisy, so the useful figure is the ratio server / engine-direct of adjacent rounds;
5. SIGTERM, and the server's exit code (must be 0).

Reports throughput (generated tokens/s, requests/s), time to first token and inter-token latency
percentiles, end-to-end latency, errors (target 0), RSS (target: flat), the server's own
counters (loads, evictions), as a Markdown table for BENCHMARKS.md. Bounded in count and time;
loopback only. Usage::

    python benchmarks/load_test.py                       # the embedded default model (SmolLM2-135M)
    python benchmarks/load_test.py --base tiny --requests 64   # a 2-layer test model: a quick smoke run
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = [
    "Summarize the plot of a detective story in two sentences.",
    "Write a SQL query that lists the ten most recent orders.",
    "Extract the name and city: Maria is 34 and lives in Lisbon.",
    "Reverse the order of these words: one two three four five",
    "Explain what a LoRA adapter is to a new engineer.",
    "List three uses of a hash map.",
]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default="default", help="'default' (embedded SmolLM2-135M), 'tiny', or a model directory")
    p.add_argument("--adapters", type=int, default=32, help="generated adapters (default 32)")
    p.add_argument("--resident", type=int, default=8, help="--max-loaded-adapters of the server (default 8)")
    p.add_argument("--clients", type=int, default=32, help="concurrent streaming clients (default 32)")
    p.add_argument("--requests", type=int, default=96, help="requests per round (default 96)")
    p.add_argument("--max-tokens", type=int, default=16, help="tokens generated per request (default 16)")
    p.add_argument("--max-running", type=int, default=16, help="server --max-running (default 16)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads of the server and of the engine-direct rounds (default 1: on a shared, "
                        "oversubscribed machine, 2 spinning OpenMP threads were 4-6x slower than 1)")
    p.add_argument("--time-limit", type=float, default=600.0, help="seconds per round before clients stop (default 600)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-direct", dest="direct", action="store_false",
                   help="skip the reference rounds that drive the engine directly, without HTTP")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    return p.parse_args()


# ------------------------------------------------------------------------------------------ setup


def load_base_for_adapters(base: str):
    """The base model in this process, only to give generated adapters the right shapes."""
    if base == "tiny":
        sys.path.insert(0, str(ROOT / "tests" / "server"))
        import srv_tiny

        return srv_tiny, None
    from loramux.base import load_base

    model, _ = load_base(None if base == "default" else base)
    return None, model


def make_adapters(model, root: Path, count: int, seed: int) -> None:
    """``count`` PEFT adapters with random non-zero A and B, saved under ``root``."""
    import torch
    from peft import LoraConfig, get_peft_model

    peft_model = None
    for i in range(count):
        rank = (8, 16)[i % 2]
        if peft_model is None or peft_model.peft_config["default"].r != rank:
            if peft_model is not None:
                model = peft_model.unload()
            peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, init_lora_weights=False,
                                                          target_modules=["q_proj", "v_proj", "o_proj"]))
        torch.manual_seed(seed * 1000 + i)
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_" in name:
                    param.normal_(0.0, 0.02)
        peft_model.save_pretrained(str(root / f"lt{i:03d}"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: argparse.Namespace, base_dir: str | None, root: Path, log_path: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "loramux.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--adapter-root", str(root), "--max-loaded-adapters", str(args.resident), "--max-running",
           str(args.max_running), "--threads", str(args.threads), "--no-bundled-adapters", "--log-level", "warning",
           "--max-waiting", str(max(1024, args.clients * 4))]
    if base_dir is not None:
        cmd += ["--base", base_dir]
    proc = subprocess.Popen(cmd, stdout=open(log_path, "wb"), stderr=subprocess.STDOUT,
                            env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}; log: {log_path}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"server did not start; log: {log_path}")


# ------------------------------------------------------------------------------------- workload


def zipf_choice(rng: random.Random, names: list[str], s: float = 1.0) -> str:
    weights = [1.0 / (i + 1) ** s for i in range(len(names))]
    return rng.choices(names, weights)[0]


async def one_request(client: httpx.AsyncClient, adapter: str, prompt: str, chat: bool, max_tokens: int) -> dict:
    body = {"model": adapter, "max_tokens": max_tokens, "temperature": 0, "stream": True, "ignore_eos": True}
    if chat:
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    start = time.perf_counter()
    times: list[float] = []
    done, usage_tokens, status = False, 0, None
    try:
        async with client.stream("POST", "/v1/chat/completions" if chat else "/v1/completions", json=body) as resp:
            status = resp.status_code
            if status != 200:
                await resp.aread()
                return {"ok": False, "status": status, "error": resp.text[:200]}
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    break
                event = json.loads(data)
                if "error" in event:
                    return {"ok": False, "status": status, "error": event["error"]["message"][:200]}
                for choice in event.get("choices", []):
                    piece = choice.get("delta", {}).get("content") if chat else choice.get("text")
                    if piece:
                        times.append(time.perf_counter())
                if event.get("usage"):
                    usage_tokens = event["usage"]["completion_tokens"]
    except httpx.HTTPError as exc:
        return {"ok": False, "status": status, "error": repr(exc)[:200]}
    end = time.perf_counter()
    if not done or not times:
        return {"ok": False, "status": status, "error": "stream ended without [DONE] or text"}
    return {"ok": True, "ttft": times[0] - start, "itl": [b - a for a, b in zip(times, times[1:])],
            "e2e": end - start, "tokens": usage_tokens}


def make_jobs(names: list[str], args: argparse.Namespace, seed: int) -> list[tuple[str, str, bool]]:
    rng = random.Random(seed)
    return [(zipf_choice(rng, names), rng.choice(PROMPTS), rng.random() < 0.5) for _ in range(args.requests)]


async def drive(jobs: list, clients: int, time_limit: float, one) -> tuple[list[dict], float]:
    """Run ``jobs`` with ``clients`` concurrent workers, each calling ``one(job)`` in turn."""
    queue: asyncio.Queue = asyncio.Queue()
    for job in jobs:
        queue.put_nowait(job)
    results: list[dict] = []
    deadline = time.monotonic() + time_limit

    async def worker() -> None:
        while time.monotonic() < deadline:
            try:
                job = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            results.append(await one(job))

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    return results, time.perf_counter() - start


def summarize(results: list[dict], wall: float, jobs: list) -> dict:
    ok = [r for r in results if r["ok"]]
    pct = lambda xs, q: statistics.quantiles(xs, n=100, method="inclusive")[q - 1] if len(xs) > 1 else (xs[0] if xs else float("nan"))
    ttft = [r["ttft"] for r in ok]
    itl = [x for r in ok for x in r["itl"]]
    e2e = [r["e2e"] for r in ok]
    tokens = sum(r["tokens"] for r in ok)
    errors = [r for r in results if not r["ok"]]
    return {
        "requests": len(results), "not_started": len(jobs) - len(results), "errors": len(errors),
        "error_samples": [e["error"] for e in errors[:3]], "wall_s": wall, "tokens": tokens,
        "tokens_per_s": tokens / wall, "requests_per_s": len(ok) / wall, "distinct_adapters": len({j[0] for j in jobs}),
        "ttft_p50_ms": 1000 * pct(ttft, 50), "ttft_p99_ms": 1000 * pct(ttft, 99),
        "itl_p50_ms": 1000 * pct(itl, 50), "itl_p99_ms": 1000 * pct(itl, 99),
        "e2e_p50_ms": 1000 * pct(e2e, 50), "e2e_p99_ms": 1000 * pct(e2e, 99),
    }


async def run_round(url: str, names: list[str], args: argparse.Namespace, round_seed: int) -> dict:
    """The workload through HTTP: streaming clients on loopback."""
    jobs = make_jobs(names, args, round_seed)
    limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(300.0), limits=limits) as client:
        results, wall = await drive(jobs, args.clients, args.time_limit,
                                    lambda job: one_request(client, job[0], job[1], job[2], args.max_tokens))
    return summarize(results, wall, jobs)


async def run_direct_round(engine, tokenizer, names: list[str], args: argparse.Namespace, round_seed: int) -> dict:
    """The same workload straight into an Engine in this process (no HTTP): the reference the
    server's figures are divided by, measured in the same run on the same (shared, noisy) machine."""
    from loramux.engine import SamplingParams

    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)

    async def one(job) -> dict:
        adapter, prompt, chat = job
        if chat:
            prompt = list(tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                        tokenize=True, return_dict=True)["input_ids"])
        start = time.perf_counter()
        handle = engine.submit(prompt, adapter=adapter, params=params)
        times, last = [], None
        async for out in handle.stream():
            if out.text:
                times.append(time.perf_counter())
            last = out
        if last is None or last.finish_reason not in ("stop", "length") or not times:
            return {"ok": False, "status": None, "error": f"{last and last.finish_reason}: {last and last.error}"}
        return {"ok": True, "ttft": times[0] - start, "itl": [b - a for a, b in zip(times, times[1:])],
                "e2e": time.perf_counter() - start, "tokens": last.completion_tokens}

    jobs = make_jobs(names, args, round_seed)
    results, wall = await drive(jobs, args.clients, args.time_limit, one)
    return summarize(results, wall, jobs)


def server_counters(url: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    wanted = {"loramux_adapter_loads_total": "loads", "loramux_adapter_evictions_total": "evictions",
              "loramux_adapter_load_errors_total": "load_errors", "loramux_adapters_resident": "resident"}
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        for sample in family.samples:
            if sample.name in wanted:
                out[wanted[sample.name]] = sample.value
    return out


def direct_engine(args: argparse.Namespace, base_dir: str | None, root: Path):
    """An Engine in this process with the server's settings (the server idles meanwhile)."""
    import torch

    from loramux import MultiLoraModel
    from loramux.base import load_base
    from loramux.engine import AdapterRegistry, Engine

    torch.set_num_threads(args.threads)
    model, tokenizer = load_base(base_dir)
    registry = AdapterRegistry()
    registry.add_root(root)
    engine = Engine(MultiLoraModel(model), tokenizer, registry=registry, max_running=args.max_running,
                    max_loaded_adapters=args.resident, max_waiting=max(1024, args.clients * 4))
    return engine.start(), tokenizer


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def rss_mb(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


# ------------------------------------------------------------------------------------------ main


def main() -> int:
    args = parse_args()
    # SIGTERM (e.g. `timeout`) unwinds through the finally blocks: the server is stopped, temp files go
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    work = Path(tempfile.mkdtemp(prefix="loramux-load-"))
    try:
        tiny, model = load_base_for_adapters(args.base)
        base_dir: str | None = None if args.base == "default" else args.base
        if tiny is not None:
            model, _ = tiny.build_base(work / "base")
            base_dir = str(work / "base")
        progress(f"generating {args.adapters} adapters")
        make_adapters(model, work / "adapters", args.adapters, args.seed)
        del model
        names = [f"lt{i:03d}" for i in range(args.adapters)]
        progress("starting loramux serve")
        proc, url = start_server(args, base_dir, work / "adapters", work / "serve.log")
        progress(f"serving on {url}; warm-up: one request per adapter")
        try:
            async def warm_all() -> None:  # every adapter loaded once, in order
                async with httpx.AsyncClient(base_url=url, timeout=300) as client:
                    for name in names:
                        r = await one_request(client, name, PROMPTS[0], False, 2)
                        if not r["ok"]:
                            raise SystemExit(f"warm-up of {name} failed: {r}")

            asyncio.run(warm_all())
            rss_before = rss_mb(proc.pid)
            progress("server round 1")
            first = asyncio.run(run_round(url, names, args, args.seed + 1))
            rss_after = rss_mb(proc.pid)
            direct = []
            if args.direct:
                progress("engine-direct round 1 (and its warm-up)")
                engine, tokenizer = direct_engine(args, base_dir, work / "adapters")
                asyncio.run(run_direct_round(engine, tokenizer, names, argparse.Namespace(**{**vars(args), "requests": len(names)}), 0))
                direct.append(asyncio.run(run_direct_round(engine, tokenizer, names, args, args.seed + 1)))
            progress("server round 2")
            second = asyncio.run(run_round(url, names, args, args.seed + 2))
            rss_after2 = rss_mb(proc.pid)
            if args.direct:
                progress("engine-direct round 2")
                direct.append(asyncio.run(run_direct_round(engine, tokenizer, names, args, args.seed + 2)))
                engine.shutdown()
            counters = server_counters(url)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                exit_code = proc.wait(120)
            except subprocess.TimeoutExpired:
                proc.kill()
                exit_code = "killed after 120 s"
        report = {"command": "python " + " ".join([sys.argv[0].replace(str(ROOT) + "/", ""), *sys.argv[1:]]),
                  "settings": {k: v for k, v in vars(args).items() if k != "json"},
                  "round1": first, "round2": second, "direct": direct, "rss_mb": {"before": rss_before, "after": rss_after,
                                                                "after_round2": rss_after2},
                  "server": counters, "exit_code": exit_code}
        print_report(report)
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2))
        bad = first["errors"] + second["errors"] + first["not_started"] + second["not_started"]
        return 0 if bad == 0 and exit_code == 0 else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


def print_report(r: dict) -> None:
    s = r["settings"]
    print(f"\n`{r['command']}`\n")
    print(f"base {s['base']}, {s['adapters']} adapters ({s['resident']} resident at most), {s['clients']} concurrent "
          f"streaming clients, {s['requests']} requests x {s['max_tokens']} tokens per round, server "
          f"--max-running {s['max_running']} --threads {s['threads']}\n")
    print("| round | requests | errors | tokens/s | req/s | TTFT p50 / p99 (ms) | ITL p50 / p99 (ms) | e2e p50 / p99 (ms) |")
    print("|---|---|---|---|---|---|---|---|")
    for name in ("round1", "round2"):
        x = r[name]
        print(f"| server {name[-1]} | {x['requests']} | {x['errors']} | {x['tokens_per_s']:.1f} | {x['requests_per_s']:.2f} | "
              f"{x['ttft_p50_ms']:.0f} / {x['ttft_p99_ms']:.0f} | {x['itl_p50_ms']:.1f} / {x['itl_p99_ms']:.1f} | "
              f"{x['e2e_p50_ms']:.0f} / {x['e2e_p99_ms']:.0f} |")
    for i, x in enumerate(r["direct"], 1):
        print(f"| engine direct {i} (no HTTP) | {x['requests']} | {x['errors']} | {x['tokens_per_s']:.1f} | "
              f"{x['requests_per_s']:.2f} | {x['ttft_p50_ms']:.0f} / {x['ttft_p99_ms']:.0f} | {x['itl_p50_ms']:.1f} / "
              f"{x['itl_p99_ms']:.1f} | {x['e2e_p50_ms']:.0f} / {x['e2e_p99_ms']:.0f} |")
    if len(r["direct"]) == 2:
        ratios = [r[f"round{i}"]["tokens_per_s"] / r["direct"][i - 1]["tokens_per_s"] for i in (1, 2)]
        print(f"\nserver / engine-direct throughput, same workload, adjacent rounds: {ratios[0]:.2f}, {ratios[1]:.2f}")
    m = r["rss_mb"]
    print(f"\nserver RSS: {m['before']:.0f} MB after warm-up, {m['after']:.0f} MB after round 1, "
          f"{m['after_round2']:.0f} MB after round 2 ({m['after_round2'] - m['after']:+.0f} MB between rounds)")
    c = r["server"]
    print(f"adapter cache: {c.get('loads', 0):.0f} loads, {c.get('evictions', 0):.0f} evictions, "
          f"{c.get('load_errors', 0):.0f} load errors; server exit code on SIGTERM: {r['exit_code']}")
    for name in ("round1", "round2"):
        if r[name]["error_samples"]:
            print(f"{name} errors: {r[name]['error_samples']}")


if __name__ == "__main__":
    sys.exit(main())
