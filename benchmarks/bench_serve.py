"""Serving benchmark (issue 4): the engine against PEFT serving patterns, side by side in one process.

A Llama with SmolLM2-135M's shape (random weights, fp32, 2 threads), 16 PEFT adapters with ranks
8/16/32/64 on all 7 linear projections (``init_lora_weights=False``). Workload: 64 requests,
Poisson arrivals, adapters drawn Zipf-like (s=1) over the catalogue, prompts of 32-256 random
tokens, exactly 64 output tokens each (EOS ignored), greedy. Systems, each fed the same workload:

(a) the engine, mixed adapters;             (b) the engine, every request on the base model;
(c) PEFT + ``generate``, one request at a time, ``set_adapter`` per request (a PEFT server behind a lock);
(d) PEFT static batches of 8 (in arrival order) with ``adapter_names=``.

For (c)/(d) a request cannot start before it arrives; a static batch starts once its 8th request
has arrived. Measured: throughput (generated tokens / time from the first arrival to the last
token), time to first token (TTFT: first token - arrival) and inter-token latency (ITL: gaps
between a request's consecutive tokens), p50/p99. Scale: the same workload over 128 and 2,000
registered adapters with at most 32 resident (count) and a byte budget of 32 average adapters; the
2,000 adapter directories are hard links to the 16 generated weight files (one disk file per rank
class would be 36 GB otherwise), each one still parsed, validated and loaded on its own; process RSS
is sampled during the run. The machine is shared: only ratios within one run mean something.

    make bench-serve                                  # full run (~30 min on 2 busy cores)
    .venv/bin/python benchmarks/bench_serve.py --quick --no-write   # smoke run: 16 requests, no PEFT (c)
"""
from __future__ import annotations

import argparse
import copy
import datetime
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from bench_common import MD_PATH, ROOT, build_base, make_peft_adapters, rss_bytes, write_section
from serve_workload import Job, make_workload, summarize

PLOT_PATH = ROOT / "benchmarks" / "serve_throughput.png"
START, END = "<!-- serve:start -->", "<!-- serve:end -->"
THREADS = 2


# ---------------------------------------------------------------------------- setup
def make_adapters(base, root: Path) -> list[str]:
    """16 PEFT adapters (ranks cycling 8/16/32/64, alpha 2r, random non-zero A and B) saved to ``root/a<i>``."""
    return [name for name, _, _ in make_peft_adapters(base, root, 16)]


def link_catalogue(src: Path, names: list[str], root: Path, count: int) -> list[str]:
    """``count`` adapter directories whose files are hard links to the 16 generated ones."""
    root.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(count):
        d = root / f"s{i:04d}"
        d.mkdir(exist_ok=True)
        for f in (src / names[i % len(names)]).iterdir():
            if not (d / f.name).exists():
                os.link(f, d / f.name)
        out.append(d.name)
    return out


def rss_mb() -> float:
    return rss_bytes() / 2**20


# ---------------------------------------------------------------------------- the engine
def run_engine(model, registry, jobs: list[Job], max_tokens: int, budget_bytes: int | None, args) -> dict:
    from loramux.engine import Engine, SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    engine = Engine(model, None, registry=registry, max_running=args.max_running, max_loaded_adapters=args.resident,
                    max_adapter_bytes=budget_bytes, prefill_chunk=args.prefill_chunk).start()
    handles: list = [None] * len(jobs)
    rss0 = rss_mb()
    t0 = time.perf_counter()

    def submitter() -> None:
        for i, job in enumerate(jobs):
            delay = t0 + job.arrival - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            handles[i] = engine.submit(job.prompt, job.adapter, params)

    thread = threading.Thread(target=submitter, daemon=True)
    thread.start()
    peak_rss, peak_bytes = rss0, 0
    while thread.is_alive() or not all(h is not None and h.finished for h in handles):
        time.sleep(0.2)
        peak_rss = max(peak_rss, rss_mb())
        peak_bytes = max(peak_bytes, engine.stats()["resident_bytes"])
    stats = engine.stats()
    engine.shutdown()
    # handle timestamps are time.monotonic(); turn them into offsets from t0 on the perf_counter clock
    shift = time.perf_counter() - time.monotonic()
    res = summarize([j.arrival for j in jobs], [[t + shift for t in h.token_times] for h in handles], t0)
    assert res["tokens"] == len(jobs) * max_tokens, res
    res.update(stats={k: stats[k] for k in ("loads", "evictions", "hits", "misses", "load_seconds", "steps",
                                            "prefill_seconds", "decode_seconds")},
               rss0=rss0, peak_rss=peak_rss, peak_adapter_mb=peak_bytes / 2**20)
    return res


# ---------------------------------------------------------------------------- PEFT peers
class StepTimes:
    """A ``generate`` streamer that records when each new token (all rows at once) comes out."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value) -> None:
        if not self._prompt_seen:  # the first call carries the prompt
            self._prompt_seen = True
            return
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def run_peft_sequential(pm, jobs: list[Job], max_tokens: int) -> dict:
    """(c): one request at a time in arrival order; ``set_adapter`` then ``generate``."""
    t0 = time.perf_counter()
    times = []
    for job in jobs:
        delay = t0 + job.arrival - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        pm.set_adapter(job.adapter)
        streamer = StepTimes()
        ids = torch.tensor([job.prompt])
        pm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                    min_new_tokens=max_tokens, do_sample=False, pad_token_id=2, streamer=streamer)
        times.append(streamer.times)
    return summarize([j.arrival for j in jobs], times, t0)


def run_peft_static(pm, jobs: list[Job], max_tokens: int, batch: int = 8) -> dict:
    """(d): static batches of ``batch`` in arrival order, left-padded, ``adapter_names=`` per row."""
    t0 = time.perf_counter()
    times = []
    for start in range(0, len(jobs), batch):
        group = jobs[start: start + batch]
        delay = t0 + group[-1].arrival - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        width = max(len(j.prompt) for j in group)
        ids = torch.tensor([[2] * (width - len(j.prompt)) + j.prompt for j in group])  # (B, T) left-padded
        mask = torch.tensor([[0] * (width - len(j.prompt)) + [1] * len(j.prompt) for j in group])
        streamer = StepTimes()
        pm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                    do_sample=False, pad_token_id=2, streamer=streamer, adapter_names=[j.adapter for j in group])
        times += [list(streamer.times) for _ in group]
    return summarize([j.arrival for j in jobs], times, t0)


# ---------------------------------------------------------------------------- report
LABELS = {"a": "(a) engine, mixed adapters", "b": "(b) engine, base model only",
          "c": "(c) PEFT generate, one at a time + set_adapter",
          "d": "(d) PEFT static batches of 8, adapter_names="}


def table_rows(res: dict) -> list[str]:
    rows = ["| system | tokens/s | TTFT p50 / p99 (s) | ITL p50 / p99 (ms) | wall (s) |", "|---|---|---|---|---|"]
    extra = res.get("also_threads")
    for key, label in [*LABELS.items(), *[(f"n{n}", f"(a) over {n} registered adapters, <= {res['resident']} resident")
                                          for n in res["scale"]],
                       *[(f"{k}{extra}t", f"{LABELS[k]}, {extra} thread(s)") for k in "ab" if extra]]:
        r = res["runs"].get(key)
        if key == "c" and r:
            label += f" (first {res['peft_seq']} requests)"
        if r:
            tps = f"{r['tps']:.1f}" + (f" (runs: {', '.join(f'{x:.1f}' for x in r['all_tps'])})"
                                       if len(r.get("all_tps", [])) > 1 else "")
            rows.append(f"| {label} | {tps} | {r['ttft50']:.2f} / {r['ttft99']:.2f} | "
                        f"{1000 * r['itl50']:.0f} / {1000 * r['itl99']:.0f} | {r['wall']:.0f} |")
    return rows


def target_lines(res: dict) -> list[str]:
    runs, out = res["runs"], []

    def check(label: str, num: str, den: str, target: float) -> None:
        if num in runs and den in runs:
            ratio = runs[num]["tps"] / runs[den]["tps"]
            out.append(f"{label}: {ratio:.2f}x (target >= {target}x) {'met' if ratio >= target else '**not met**'}")

    check("(a) / (b), mixed adapters over base only", "a", "b", 0.85)
    if "a" in runs and "b" in runs and len(runs["a"]["all_tps"]) == len(runs["b"]["all_tps"]) > 1:
        paired = [a / b for a, b in zip(runs["a"]["all_tps"], runs["b"]["all_tps"])]
        out.append("(a) / (b) round by round (each (a) run over the (b) run right after it): "
                   + ", ".join(f"{p:.2f}" for p in paired) + f"; median {statistics.median(paired):.2f}")
    extra = res.get("also_threads")
    if extra and f"a{extra}t" in runs:
        check(f"(a) / (b) on {extra} thread(s) (not the protocol's setting; for comparison)", f"a{extra}t", f"b{extra}t", 0.85)
    for key in ("a", "b"):
        if key in runs and runs[key].get("stats", {}).get("steps"):
            st = runs[key]["stats"]
            out.append(f"{LABELS[key]}: {st['steps']} engine steps, {st['prefill_seconds']:.1f} s in prefill forwards, "
                       f"{st['decode_seconds']:.1f} s in decode forwards")
    check("(a) / (c), over PEFT one at a time", "a", "c", 4.0)
    check("(a) / (d), over PEFT static batches", "a", "d", 2.0)
    big = max(res["scale"], default=None)
    if big:
        check(f"{big} registered / 16 registered adapters", f"n{big}", "a", 0.8)
        r = runs[f"n{big}"]
        out.append(f"{big} registered: adapter loads {r['stats']['loads']}, evictions {r['stats']['evictions']}, "
                   f"hits {r['stats']['hits']}, misses {r['stats']['misses']}, load time {r['stats']['load_seconds']:.1f} s "
                   f"in the background; resident adapters peaked at {r['peak_adapter_mb']:.0f} MB "
                   f"(budget {res['budget_mb']:.0f} MB, {res['resident']} adapters); process RSS {r['rss0']:.0f} MB "
                   f"before the run, {r['peak_rss']:.0f} MB at peak (base model + PEFT peer + KV cache + adapters)")
    return out


def markdown(res: dict, command: str) -> str:
    env = (f"torch {torch.__version__}, transformers {res['versions'][0]}, peft {res['versions'][1]}, "
           f"{torch.get_num_threads()} threads, engine max_running={res['max_running']}, "
           f"prefill_chunk={res['prefill_chunk']}")
    out = [START, "## Serving benchmark", "",
           f"Command: `{command}`; run {res['date']}; {env}; {res['runtime'] / 60:.0f} min; 1-min load average "
           f"{res['load'][0]:.1f} at start, {res['load'][1]:.1f} at end (other users of the machine).", "",
           f"Workload: {res['requests']} requests, Poisson arrivals at {res['rate']}/s, prompts 32-256 random tokens, "
           f"{res['max_tokens']} output tokens each (EOS ignored), greedy; adapters Zipf-like (s=1) over the catalogue. "
           "Llama with SmolLM2-135M's shape (random weights, fp32); 16 adapters, ranks 8/16/32/64 on all 7 "
           "projections. (a) and (b) alternate; the row shows the median run by throughput (of an even count, the slower) "
           "and every run's figure; the others run once (the full set takes ~40 min here). All in one process; "
           "compare ratios, not absolute figures. TTFT includes queueing: the arrivals outpace every system.", ""]
    out += table_rows(res) + [""] + [f"- {line}" for line in target_lines(res)]
    out += ["", f"![throughput against registered adapters]({PLOT_PATH.relative_to(ROOT)})", END]
    return "\n".join(out) + "\n"


def plot(res: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = res["runs"]
    xs = [16] + list(res["scale"])
    ys = [runs["a"]["tps"]] + [runs[f"n{n}"]["tps"] for n in res["scale"]]
    fig, ax = plt.subplots(figsize=(6.4, 4))
    ax.plot(xs, ys, "o-", label=f"engine, mixed adapters (<= {res['resident']} resident)")
    for key, style in (("b", "--"), ("d", ":"), ("c", "-.")):
        if key in runs:
            ax.axhline(runs[key]["tps"], linestyle=style, color="gray", label=LABELS[key])
    ax.set_xscale("log")
    ax.set_xlabel("registered adapters")
    ax.set_ylabel("generated tokens / s")
    ax.set_ylim(bottom=0)
    ax.set_title(f"{res['requests']} requests, {torch.get_num_threads()} CPU threads, SmolLM2-135M shape")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(PLOT_PATH, dpi=110)


# ---------------------------------------------------------------------------- main
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rate", type=float, default=4.0, help="mean arrivals per second (Poisson)")
    parser.add_argument("--max-running", type=int, default=32)
    parser.add_argument("--prefill-chunk", type=int, default=256)
    parser.add_argument("--resident", type=int, default=32, help="max resident adapters in the scale runs")
    parser.add_argument("--scale", default="128,2000", help="registered-adapter counts for the scale runs")
    parser.add_argument("--systems", default="abcd", help="which of (a)-(d) to run")
    parser.add_argument("--peft-seq-requests", type=int, default=16,
                        help="(c) runs the first N requests only: one at a time it takes ~40 s per request here")
    parser.add_argument("--threads", type=int, default=THREADS)
    parser.add_argument("--engine-repeats", type=int, default=3, help="(a)/(b) runs each, alternating")
    parser.add_argument("--also-threads", type=int, default=1,
                        help="then (a) and (b) once more on this many threads (0: skip), for the thread-count effect")
    parser.add_argument("--quick", action="store_true", help="16 requests, no (c), scale 2000 only")
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md and the plot alone")
    args = parser.parse_args()
    if args.quick:
        args.requests, args.systems, args.scale = 16, args.systems.replace("c", ""), "2000"
    torch.set_num_threads(args.threads)
    print(f"torch.set_num_threads({args.threads}) -> {torch.get_num_threads()}")
    import peft
    import transformers
    from peft import PeftModel
    from transformers.utils import logging as hf_logging

    from loramux import MultiLoraModel
    from loramux.engine import AdapterRegistry

    hf_logging.set_verbosity_error()
    t_start = time.perf_counter()
    scale = [int(x) for x in args.scale.split(",") if x]
    res = {"date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), "load": [os.getloadavg()[0]],
           "peft_seq": args.peft_seq_requests,
           "versions": (transformers.__version__, peft.__version__), "runs": {}, "scale": scale,
           "requests": args.requests, "rate": args.rate, "max_tokens": args.max_tokens, "resident": args.resident,
           "max_running": args.max_running, "prefill_chunk": args.prefill_chunk}
    base = build_base()
    with tempfile.TemporaryDirectory(prefix="loramux-bench-serve-") as tmp:
        tmp = Path(tmp)
        names = make_adapters(base, tmp / "src")
        sizes = [sum(f.stat().st_size for f in (tmp / "src" / n).iterdir()) for n in names]
        budget = args.resident * int(statistics.mean(sizes))  # fp32 files: their size is the loaded size
        res["budget_mb"] = budget / 2**20
        print(f"built base + 16 adapters in {time.perf_counter() - t_start:.0f} s")
        pm = None
        if set(args.systems) & set("cd"):
            pm = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp / "src" / names[0]), adapter_name=names[0])
            for n in names[1:]:
                pm.load_adapter(str(tmp / "src" / n), adapter_name=n)
            pm.eval()
        lm = MultiLoraModel(base)
        registry = AdapterRegistry()
        registry.add_root(tmp / "src")
        jobs = make_workload(names, args.requests, args.rate, seed=0)
        warm = make_workload(names, 4, 100.0, seed=1)
        repeats: dict[str, list[dict]] = {}
        with torch.inference_mode():
            run_engine(lm, registry, [Job(0, j.prompt[:40], j.adapter) for j in warm], 4, None, args)  # warm-up
            if pm is not None:
                run_peft_static(pm, [Job(0, j.prompt[:40], j.adapter) for j in warm], 4, batch=4)
            # (a) and (b) alternate ``--engine-repeats`` times (the machine's load drifts), (c) last: the slowest
            order = "ab" * (args.engine_repeats - 1) + "abdc"
            for key in order:
                if key not in args.systems:
                    continue
                t = time.perf_counter()
                if key in "ab":
                    if key == "a":  # steady state: the 16 adapters resident (the scale runs start cold)
                        for n in names:
                            if n not in lm.adapters:
                                lm.load_adapter(tmp / "src" / n, adapter_name=n)
                    wl = jobs if key == "a" else [Job(j.arrival, j.prompt, None) for j in jobs]
                    run = run_engine(lm, registry, wl, args.max_tokens, None, args)
                elif key == "c":
                    run = run_peft_sequential(pm, jobs[: args.peft_seq_requests], args.max_tokens)
                else:
                    run = run_peft_static(pm, jobs, args.max_tokens)
                repeats.setdefault(key, []).append(run)
                print(f"{LABELS[key]}: {run['tps']:.1f} tok/s in {time.perf_counter() - t:.0f} s", flush=True)
            for key, runs in repeats.items():  # the median run by throughput (of an even count: the slower, conservative)
                res["runs"][key] = dict(sorted(runs, key=lambda r: r["tps"])[(len(runs) - 1) // 2],
                                        all_tps=[r["tps"] for r in runs])
            del pm
            for n in scale:
                for name in list(lm.adapters):  # start cold, like a fresh server over a big catalogue
                    lm.delete_adapter(name)
                cat = link_catalogue(tmp / "src", names, tmp / f"cat{n}", n)
                reg = AdapterRegistry()
                reg.add_root(tmp / f"cat{n}")
                wl = make_workload(cat, args.requests, args.rate, seed=0)
                t = time.perf_counter()
                res["runs"][f"n{n}"] = run_engine(lm, reg, wl, args.max_tokens, budget, args)
                r = res["runs"][f"n{n}"]
                print(f"{n} registered: {r['tps']:.1f} tok/s in {time.perf_counter() - t:.0f} s, {r['stats']}, "
                      f"adapters peak {r['peak_adapter_mb']:.0f} MB, RSS {r['rss0']:.0f} -> {r['peak_rss']:.0f} MB")
            if args.also_threads:  # the same (a)/(b) pair on another thread count: small LoRA matmuls scale badly
                torch.set_num_threads(args.also_threads)
                for name in list(lm.adapters):
                    lm.delete_adapter(name)
                for n in names:
                    if n not in lm.adapters:
                        lm.load_adapter(tmp / "src" / n, adapter_name=n)
                for key in "ab":
                    wl = jobs if key == "a" else [Job(j.arrival, j.prompt, None) for j in jobs]
                    run = res["runs"][f"{key}{args.also_threads}t"] = run_engine(lm, registry, wl, args.max_tokens, None, args)
                    print(f"{LABELS[key]}, {args.also_threads} thread(s): {run['tps']:.1f} tok/s", flush=True)
                torch.set_num_threads(args.threads)
    res["also_threads"] = args.also_threads
    res["load"].append(os.getloadavg()[0])
    res["runtime"] = time.perf_counter() - t_start
    print("\n".join(table_rows(res)))
    print("\n".join(target_lines(res)))
    if not args.no_write:
        command = "make bench-serve  (.venv/bin/python benchmarks/bench_serve.py" + (" --quick)" if args.quick else ")")
        write_section(START, END, markdown(res, command))
        if "a" in res["runs"] and scale:
            plot(res)
        print(f"wrote the serving section of {MD_PATH} and {PLOT_PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
