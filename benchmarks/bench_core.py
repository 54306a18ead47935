"""Core benchmark (issue 2): loramux against PEFT, side by side in one process, as ratios.

A Llama with SmolLM2-135M's shape (random weights, fp32), 16 PEFT adapters with ranks 8/16/32/64 on
all 7 linear projections of every layer (``init_lora_weights=False``: non-zero B), saved with
``save_pretrained``. Measured, each as a median after warm-up:

1. adapter load time, warm page cache: PEFT ``load_adapter`` over loramux ``load_adapter``;
   and whether a load gets slower as more adapters are loaded (first vs last rank cycle);
2. switching the default adapter: PEFT ``set_adapter`` over loramux ``set_adapter``;
3. prefill, B8 x T128, 8 distinct adapters: time over the plain base model's time;
4. one decode step with a KV cache (128 cached tokens), B8, 8 distinct adapters: over the base step;
5. resident memory added by loading 16 adapters (RSS delta, fresh subprocess) over their parameter bytes.

Machines here are shared and noisy: the three models (plain base, loramux, PEFT) run interleaved in
rounds with a rotating order, and only ratios within this run are reported. Prefill and decode are
measured twice: on 2 threads by wall time (the targets), and on 1 thread by that thread's CPU time
(3' and 4': the work itself, which other users of the machine cannot stretch). OpenMP waits follow
libgomp's default unless OMP_WAIT_POLICY is set (see below). Forwards keep the logits
of the last position only (``logits_to_keep=1``, what ``generate`` does), so the vocabulary projection
does not dilute the LoRA overhead. "base" is plain transformers (MKL); loramux's own base linears run
the decode GEMM kernel (dense_kernel.py), so its decode rows include that gain.

First, the decode-step table of issue 13 (bench_steps.py): plain transformers and loramux at B1 and B16,
base rows and 4 mixed adapters, against the floor (stream bandwidth, sgemm peak) measured in the same run.

    make bench                          # full run, a few minutes on 2 cores
    .venv/bin/python benchmarks/bench_core.py --steps-only    # the step table only, printed
    BENCH_QUICK=1 make bench            # smoke run, fewer repetitions
    .venv/bin/python benchmarks/bench_core.py --no-write   # print only, leave BENCHMARKS.md alone
"""
from __future__ import annotations

import argparse
import copy
import ctypes
import datetime
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

# OpenMP wait policy: libgomp's default (spin a while, then sleep) unless the caller sets one. PASSIVE
# (sleep at once) was this script's default until the decode GEMM kernel: in this VM every parallel
# region then paid a futex wake-up of the other vCPU, ~200 us, and a decode step has ~211 of them
# (the 211 matmuls of a B1 step: 82 ms PASSIVE against 21 ms default, 2 threads). ACTIVE spins for
# ever and is 2-5x slower on an oversubscribed machine. The policy in force is printed and recorded.
OMP_POLICY = os.environ.get("OMP_WAIT_POLICY", "default (unset)")

import torch  # noqa: E402
from bench_common import MD_PATH, RANKS, build_base, machine, make_peft_adapters, rss_bytes, write_section  # noqa: E402
from bench_steps import bench_steps, step_lines, step_rows  # noqa: E402

warnings.filterwarnings("ignore")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

QUICK = os.environ.get("BENCH_QUICK", "") not in ("", "0")
THREADS = int(os.environ.get("BENCH_THREADS", "2"))
N_ADAPTERS = 16
BATCH, PROMPT = 8, 128
REPS = dict(load_rounds=1 if QUICK else 2, memory_cycles=1 if QUICK else 2, set_lm=3 if QUICK else 7, set_peft=3 if QUICK else 9,
            prefill=1 if QUICK else 4, prefill_1t=1 if QUICK else 3, decode=3 if QUICK else 15, steps=3 if QUICK else 9)
START, END = "<!-- core:start -->", "<!-- core:end -->"
STEPS_START, STEPS_END = "<!-- steps:start -->", "<!-- steps:end -->"


# ---------------------------------------------------------------------------- setup
def make_adapters(base, root: Path) -> list[tuple[str, Path, int]]:
    """16 PEFT adapters (ranks cycling 8/16/32/64, alpha 2r), saved by ``save_pretrained`` to ``root/a<i>``."""
    return make_peft_adapters(base, root, N_ADAPTERS)


def warm_page_cache(adapters) -> None:
    for _, path, _ in adapters:
        for f in path.iterdir():
            f.read_bytes()


def settle() -> None:
    """Collect garbage and hand freed heap back to the OS, so RSS shows live memory only."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc
        pass


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------- 1, 2: load and switch
def bench_load(lm, pm_base, adapters) -> tuple[dict, object]:
    """Per-adapter load times, in load order: loramux (median over rounds) and PEFT (one round: ~1 s
    each); then once more each on 1 thread by CPU time (``*_1t``), after deleting them."""
    from peft import PeftModel

    def timed_loads(load, todo, clock=time.perf_counter):
        out = []
        for name, path, _ in todo:
            t0 = clock()
            load(path, name)
            out.append(clock() - t0)
        return out

    warm_page_cache(adapters)
    lm_load = lambda path, name: lm.load_adapter(path, adapter_name=name)  # noqa: E731
    lm_load(adapters[0][1], "warmup")  # first-call costs (imports, allocator)
    lm.delete_adapter("warmup")
    rounds = []
    for r in range(REPS["load_rounds"]):
        if r:
            for name, _, _ in adapters:
                lm.delete_adapter(name)
        rounds.append(timed_loads(lm_load, adapters))
    pm = PeftModel.from_pretrained(pm_base, str(adapters[0][1]), adapter_name=adapters[0][0])  # also PEFT's warm-up
    peft_load = lambda path, name: pm.load_adapter(str(path), adapter_name=name)  # noqa: E731
    res = {"lm": [statistics.median(ts) for ts in zip(*rounds)], "peft": [None] + timed_loads(peft_load, adapters[1:])}
    # issue 13 target 5: a load against the time to read the file's bytes (``read_bytes``, warm page cache)
    res["read"] = [statistics.median(timed((path / "adapter_model.safetensors").read_bytes) for _ in range(5))
                   for _, path, _ in adapters]
    torch.set_num_threads(1)
    for name, _, _ in adapters[1:]:
        lm.delete_adapter(name)
        pm.delete_adapter(name)
    res["lm_1t"] = timed_loads(lm_load, adapters[1:], time.thread_time)
    res["peft_1t"] = timed_loads(peft_load, adapters[1:], time.thread_time)
    torch.set_num_threads(THREADS)
    pm.eval()
    return res, pm


def bench_set_adapter(lm, pm, names) -> dict:
    n = 20000

    def lm_switch():
        for i in range(n):
            lm.set_adapter(names[i & 7])

    lm_t = statistics.median(timed(lm_switch) / n for _ in range(REPS["set_lm"]))
    peft_t = statistics.median(timed(lambda i=i: pm.set_adapter(names[i % len(names)])) for i in range(1, REPS["set_peft"] + 1))
    lm.set_adapter(None)
    return {"lm": lm_t, "peft": peft_t}


# ---------------------------------------------------------------------------- 3, 4: forwards
def interleaved(calls: dict, reps: int, warmup: int = 1, before=None, clock=time.perf_counter) -> dict:
    """Run every call ``warmup`` times, then ``reps`` rounds in rotating order; median ``clock`` seconds per call."""
    keys = list(calls)
    for _ in range(warmup):
        for k in keys:
            if before:
                before(k)
            calls[k]()
    times = {k: [] for k in keys}
    for r in range(reps):
        for k in keys[r % len(keys):] + keys[:r % len(keys)]:
            if before:
                before(k)
            t0 = clock()
            calls[k]()
            times[k].append(clock() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def bench_prefill(base, lm, pm, mixed, reps: int, clock=time.perf_counter) -> dict:
    ids = torch.randint(3, 49152, (BATCH, PROMPT), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    kw = dict(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=1)
    calls = {"base": lambda: base(**kw),
             "lm_mixed": lambda: lm(**kw, adapter_names=mixed),
             "peft_mixed": lambda: pm(**kw, adapter_names=mixed)}
    return interleaved(calls, reps, clock=clock)


def bench_decode(base, lm, pm, mixed, one, reps: int, clock=time.perf_counter) -> dict:
    """One decode step after a 128-token prefill; the cache is cropped back to 128 before each step."""
    ids = torch.randint(3, 49152, (BATCH, PROMPT), generator=torch.Generator().manual_seed(2))
    nxt = torch.randint(3, 49152, (BATCH, 1), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(BATCH, PROMPT + 1, dtype=torch.long)
    pos = torch.full((BATCH, 1), PROMPT, dtype=torch.long)
    runners = {"base": (base, {}), "lm_mixed": (lm, {"adapter_names": mixed}), "peft_mixed": (pm, {"adapter_names": mixed}),
               "lm_base_rows": (lm, {"adapter_names": ["__base__"] * BATCH}), "lm_one": (lm, {"adapter_names": [one] * BATCH})}
    # one prefill makes the 128-token cache; each runner steps on its own copy (a step's cost does not
    # depend on the cached values, and five B8xT128 prefills would dominate the benchmark's runtime)
    prefilled = base(input_ids=ids, use_cache=True, logits_to_keep=1).past_key_values
    caches = {k: copy.deepcopy(prefilled) for k in runners}
    calls = {k: (lambda m=m, extra=extra, k=k: m(input_ids=nxt, attention_mask=mask, position_ids=pos,
                                                 past_key_values=caches[k], use_cache=True, logits_to_keep=1, **extra))
             for k, (m, extra) in runners.items()}

    def reset(k):  # drop the token the previous step appended (crop takes a negative count)
        extra = caches[k].get_seq_length() - PROMPT
        if extra:
            caches[k].crop(-extra)

    return interleaved(calls, reps, warmup=3, before=reset, clock=clock)


# ---------------------------------------------------------------------------- 5: memory (fresh process)
def memory_child(root: str) -> None:
    """In a fresh process: RSS added by loading all adapters, over their parameter bytes; reload cycles;
    and what a mixed decode step adds on top (caches the forward path keeps, such as stacked weights)."""
    torch.set_num_threads(THREADS)
    from transformers import LlamaForCausalLM

    from loramux import MultiLoraModel

    paths = [Path(root) / f"a{i}" for i in range(N_ADAPTERS)]
    lm = MultiLoraModel(LlamaForCausalLM.from_pretrained(Path(root) / "base", dtype=torch.float32).eval())
    for p in paths:
        for f in p.iterdir():
            f.read_bytes()
    settle()
    before = rss_bytes()
    infos = [lm.load_adapter(p, adapter_name=p.name) for p in paths]
    settle()
    after = rss_bytes()
    cycles = []
    for _ in range(REPS["memory_cycles"]):  # delete all, load all again: RSS should stay flat
        for p in paths:
            lm.delete_adapter(p.name)
        for p in paths:
            lm.load_adapter(p, adapter_name=p.name)
        settle()
        cycles.append(rss_bytes())
    ids = torch.randint(3, 49152, (BATCH, 16), generator=torch.Generator().manual_seed(4))
    forward = {}
    with torch.inference_mode():
        for label, names in (("base_rows", ["__base__"] * BATCH), ("mixed", [p.name for p in paths[:BATCH]])):
            cache = lm(input_ids=ids, use_cache=True, logits_to_keep=1, adapter_names=names).past_key_values
            lm(input_ids=ids[:, :1], past_key_values=cache, use_cache=True, logits_to_keep=1, adapter_names=names)
            del cache
            settle()
            forward[label] = rss_bytes()
    print(json.dumps({"rss_before": before, "rss_after": after, "param_bytes": sum(i.nbytes for i in infos),
                      "cycles": cycles, "forward": forward}))


def bench_memory(root: Path) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--memory-child", str(root)], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"memory subprocess failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------- report
def rows(res: dict) -> list[tuple[str, str, str, str, str, bool]]:
    """(measure, loramux, PEFT, ratio, target, met) for the table and BENCHMARKS.md."""
    lm_load, peft_load = res["load"]["lm"], res["load"]["peft"]
    lm_med, peft_med = statistics.median(lm_load[1:]), statistics.median(peft_load[1:])
    lm1, peft1 = statistics.median(res["load"]["lm_1t"]), statistics.median(res["load"]["peft_1t"])
    k = len(RANKS)
    lm_first, lm_last = sum(lm_load[:k]), sum(lm_load[-k:])
    peft_first, peft_last = sum(peft_load[1:k + 1]), sum(peft_load[-k:])
    s, p, d, m = res["set"], res["prefill"], res["decode"], res["memory"]
    p1, d1 = res["prefill_1t"], res["decode_1t"]
    mem_ratio = (m["rss_after"] - m["rss_before"]) / m["param_bytes"]
    by_rank = [statistics.median(lm_load[i::k]) / statistics.median(res["load"]["read"][i::k]) for i in range(k)]
    worst_read, read_ratios = max(by_rank), " ".join(f"{r:.1f}" for r in by_rank)
    out = [
        ("1. load_adapter, median of 15 (warm cache)", f"{lm_med * 1e3:.1f} ms", f"{peft_med * 1e3:.0f} ms",
         f"PEFT/loramux {peft_med / lm_med:.0f}x", ">= 30x", peft_med / lm_med >= 30),
        ("1'. the same, 1 thread, CPU time", f"{lm1 * 1e3:.1f} ms", f"{peft1 * 1e3:.0f} ms",
         f"PEFT/loramux {peft1 / lm1:.0f}x", ">= 30x", peft1 / lm1 >= 30),
        ("   load growth: last 4 loads / first 4 (ranks 8..64)", f"{lm_last * 1e3:.0f}/{lm_first * 1e3:.0f} ms = {lm_last / lm_first:.2f}",
         f"{peft_last * 1e3:.0f}/{peft_first * 1e3:.0f} ms = {peft_last / peft_first:.2f}", "loramux last/first",
         "flat (<= 1.3)", lm_last / lm_first <= 1.3),
        ("1''. load_adapter / read_bytes of its file, worst rank", f"{worst_read:.2f}", "",
         f"ranks 8..64: {read_ratios}", "<= 2 (issue 13)", worst_read <= 2),
        ("2. set_adapter (16 loaded)", f"{s['lm'] * 1e6:.2f} us", f"{s['peft'] * 1e3:.1f} ms",
         f"PEFT/loramux {s['peft'] / s['lm']:.0f}x", ">= 1000x", s["peft"] / s["lm"] >= 1000),
        ("3. prefill B8xT128, 8 adapters / base", f"{p['lm_mixed'] / p['base']:.3f}", f"{p['peft_mixed'] / p['base']:.3f}",
         f"base {p['base'] * 1e3:.0f} ms", "loramux <= 1.10", p["lm_mixed"] / p["base"] <= 1.10),
        ("3'. the same, 1 thread, CPU time", f"{p1['lm_mixed'] / p1['base']:.3f}", f"{p1['peft_mixed'] / p1['base']:.3f}",
         f"base {p1['base'] * 1e3:.0f} ms", "loramux <= 1.10", p1["lm_mixed"] / p1["base"] <= 1.10),
        ("4. decode step B8 (128 cached), 8 adapters / base", f"{d['lm_mixed'] / d['base']:.3f}", f"{d['peft_mixed'] / d['base']:.3f}",
         f"base {d['base'] * 1e3:.1f} ms", "loramux <= 1.15", d["lm_mixed"] / d["base"] <= 1.15),
        ("4'. the same, 1 thread, CPU time", f"{d1['lm_mixed'] / d1['base']:.3f}", f"{d1['peft_mixed'] / d1['base']:.3f}",
         f"base {d1['base'] * 1e3:.1f} ms", "loramux <= 1.15", d1["lm_mixed"] / d1["base"] <= 1.15),
        ("5. RSS added by 16 adapters / their param bytes", f"{mem_ratio:.3f}", "",
         f"{(m['rss_after'] - m['rss_before']) / 2**20:.0f} MiB / {m['param_bytes'] / 2**20:.0f} MiB", "<= 1.05", mem_ratio <= 1.05),
    ]
    return out


def extra_lines(res: dict) -> list[str]:
    d, m, d1 = res["decode"], res["memory"], res["decode_1t"]
    lines = []
    if "bytes" in res:
        b = res["bytes"]
        lines.append(f"weights a decode step reads: base {b['base'] / 2**20:.0f} MiB, the batch's 8 adapters "
                     f"{b['mixed'] / 2**20:.0f} MiB more ({b['mixed'] / b['base']:.0%}); prefill reuses them over 128 tokens")
    lines.append(f"decode, all 8 rows on one adapter (r8) / base: loramux {d['lm_one'] / d['base']:.3f} "
                 f"(1 thread, CPU time: {d1['lm_one'] / d1['base']:.3f}); all rows `__base__` / base: "
                 f"{d['lm_base_rows'] / d['base']:.3f} ({d1['lm_base_rows'] / d1['base']:.3f})")
    lines.append(f"RSS after {len(m['cycles'])} more delete-all/load-all cycles: "
                 + ", ".join(f"{(c - m['rss_before']) / 2**20:.0f}" for c in m["cycles"])
                 + f" MiB over the unloaded model (first load: {(m['rss_after'] - m['rss_before']) / 2**20:.0f} MiB)")
    if "forward" in m:
        lines.append(f"RSS added by a mixed-8 decode step after a `__base__` one (forward-path caches): "
                     f"{(m['forward']['mixed'] - m['forward']['base_rows']) / 2**20:.0f} MiB")
    lines.append("loramux load times in load order (ms): " + " ".join(f"{t * 1e3:.0f}" for t in res["load"]["lm"]))
    lines.append("read_bytes of each adapter's file, warm page cache, in load order (ms): "
                 + " ".join(f"{t * 1e3:.1f}" for t in res["load"]["read"]))
    lines.append("PEFT load_adapter times in load order (ms; #0 is from_pretrained, untimed): "
                 + " ".join(f"{t * 1e3:.0f}" for t in res["load"]["peft"][1:]))
    return lines


def print_steps(res: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for part, title in ((res["steps"], f"{torch.get_num_threads()} threads, wall time"),
                        (res["steps"]["cpu"], "1 thread, its CPU time")):
        table = Table(title=f"decode steps against the floor ({title}, load average {part['load']:.1f})")
        for col in ("step", "ms", "/ floor", "target", "met"):
            table.add_column(col)
        for *cells, met in step_rows(part):
            table.add_row(*cells, "" if met is None else "[green]yes[/]" if met else "[red]no[/]")
        console.print(table)
        for line in step_lines(part):
            console.print(line)


def steps_markdown(res: dict) -> list[str]:
    out = []
    for part, title in ((res["steps"], f"{torch.get_num_threads()} threads, wall time (the targets)"),
                        (res["steps"]["cpu"], "1 thread, its CPU time, floor on 1 thread too (what other users cannot stretch)")):
        out += ["", f"Decode steps against the floor measured in the same run, {title}; load average {part['load']:.1f}; "
                    "medians of interleaved rounds; 128 cached tokens; see benchmarks/bench_steps.py:", "",
                "| step | ms | / floor | target | met |", "|---|---|---|---|---|"]
        out += [f"| {' | '.join(cells)} | {'' if met is None else 'yes' if met else '**no**'} |" for *cells, met in step_rows(part)]
        out += [""] + [f"- {line}" for line in step_lines(part)]
    return out


def print_table(res: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    if "steps" in res:
        print_steps(res)
    if "load" not in res:
        return

    table = Table(title=f"loramux core benchmark ({torch.get_num_threads()} threads{', QUICK' if QUICK else ''})")
    for col in ("measure", "loramux", "PEFT", "ratio / base", "target", "met"):
        table.add_column(col)
    for *cells, met in rows(res):
        table.add_row(*cells, "[green]yes[/]" if met else "[red]no[/]")
    console = Console()
    console.print(table)
    for line in extra_lines(res):
        console.print(line)


def markdown(res: dict, command: str) -> str:
    env = (f"torch {torch.__version__}, transformers {res['versions']['transformers']}, peft {res['versions']['peft']}, "
           f"{machine()}, {torch.get_num_threads()} threads, "
           f"OMP_WAIT_POLICY={OMP_POLICY}")
    out = [START, "## Core benchmark", "",
           f"Command: `{command}`{' (BENCH_QUICK=1: fewer repetitions)' if QUICK else ''}; run {res['date']}; {env}; "
           f"{res['runtime'] / 60:.0f} min; 1-min load average {res['load_before']:.1f} at start, {res['load_after']:.1f} "
           "at end (the machine's other users).",
           "Llama with SmolLM2-135M's shape (random weights, fp32), 16 PEFT adapters (ranks 8/16/32/64, all 7 "
           "projections, `init_lora_weights=False`). Plain base, loramux and PEFT run interleaved in one process; "
           "medians after warm-up; forwards keep the last position's logits only. Ratios are what to compare "
           "(the machine is shared).", "",
           "| measure | loramux | PEFT | ratio | target | met |", "|---|---|---|---|---|---|"]
    if "load" in res:
        out += [f"| {' | '.join(c.strip() for c in cells)} | {'yes' if met else '**no**'} |" for *cells, met in rows(res)]
        out += [""] + [f"- {line}" for line in extra_lines(res)]
    if "steps" in res:
        out += steps_markdown(res)
    out += [END]
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------- main
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-write", action="store_true", help="print the table, leave BENCHMARKS.md alone")
    parser.add_argument("--steps-only", action="store_true", help="only the decode-step table against the floor")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args.memory_child)
        return 0
    torch.set_num_threads(THREADS)
    print(f"torch.set_num_threads({THREADS}) -> torch.get_num_threads() = {torch.get_num_threads()}; "
          f"OMP_WAIT_POLICY={OMP_POLICY}; quick={QUICK}")
    import peft
    import transformers
    from loramux import MultiLoraModel

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    res = {"date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), "load_before": os.getloadavg()[0],
           "versions": {"transformers": transformers.__version__, "peft": peft.__version__}}
    t_start = time.perf_counter()
    base = build_base()
    with tempfile.TemporaryDirectory(prefix="loramux-bench-steps-") as tmp:
        res["steps"] = bench_steps(base, REPS["steps"], Path(tmp))
    print(f"decode-step table done at {time.perf_counter() - t_start:.0f} s")
    if args.steps_only:
        res["load_after"], res["runtime"] = os.getloadavg()[0], time.perf_counter() - t_start
        print_table(res)
        if not args.no_write:  # its own section: the full run's core section stays as it was
            write_section(STEPS_START, STEPS_END, "\n".join(
                [STEPS_START, "## Decode steps against the floor (bench_core.py --steps-only)", "",
                 f"Command: `.venv/bin/python benchmarks/bench_core.py --steps-only`; run {res['date']}; torch {torch.__version__}, "
                 f"{machine()}, {torch.get_num_threads()} threads, OMP_WAIT_POLICY={OMP_POLICY}; {res['runtime'] / 60:.0f} min; 1-min load "
                 f"average {res['load_before']:.1f} at start, {res['load_after']:.1f} at end."] + steps_markdown(res) + [STEPS_END]) + "\n")
            print(f"wrote the steps section of {MD_PATH}")
        return 0
    with tempfile.TemporaryDirectory(prefix="loramux-bench-") as tmp:
        adapters = make_adapters(base, Path(tmp))
        names = [name for name, _, _ in adapters]
        print(f"built base + {len(adapters)} adapters in {time.perf_counter() - t_start:.0f} s")
        base.save_pretrained(Path(tmp) / "base")  # the memory subprocess loads it (fast) instead of re-initialising
        res["memory"] = bench_memory(Path(tmp))
        lm = MultiLoraModel(copy.deepcopy(base))
        res["load"], pm = bench_load(lm, copy.deepcopy(base), adapters)
        print(f"loads done at {time.perf_counter() - t_start:.0f} s")
    res["set"] = bench_set_adapter(lm, pm, names)
    mixed, one = names[:BATCH], names[0]  # 8 distinct adapters: ranks 8, 16, 32, 64, 8, 16, 32, 64
    res["bytes"] = {"mixed": sum(lm.adapters[n].nbytes for n in mixed), "base": lm.memory_report()["base_bytes"]}
    with torch.inference_mode():
        res["prefill"] = bench_prefill(base, lm, pm, mixed, REPS["prefill"])
        print(f"prefill done at {time.perf_counter() - t_start:.0f} s")
        res["decode"] = bench_decode(base, lm, pm, mixed, one, REPS["decode"])
        # The same on one thread, timed by that thread's CPU time: the work itself, which other users of
        # a shared machine cannot stretch (they can stretch wall time, and 2-thread sync, a lot).
        torch.set_num_threads(1)
        res["prefill_1t"] = bench_prefill(base, lm, pm, mixed, REPS["prefill_1t"], clock=time.thread_time)
        res["decode_1t"] = bench_decode(base, lm, pm, mixed, one, REPS["decode"], clock=time.thread_time)
        torch.set_num_threads(THREADS)
    res["load_after"], res["runtime"] = os.getloadavg()[0], time.perf_counter() - t_start
    print(f"total {res['runtime']:.0f} s; load average {res['load_before']:.1f} before, {res['load_after']:.1f} after")
    print_table(res)
    if not args.no_write:
        command = ("BENCH_QUICK=1 " if QUICK else "") + "make bench  (.venv/bin/python benchmarks/bench_core.py)"
        write_section(START, END, markdown(res, command))
        print(f"wrote the core section of {MD_PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
