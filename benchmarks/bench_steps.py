"""The decode-step table (issue 13): plain transformers and loramux against the machine's floor, in one run.

The floor is measured in the same run, interleaved with the steps: the streaming bandwidth of a
256 MiB ``sum()`` and the peak of a large sgemm (2048^3, MKL). A decode step of B rows must at least
read every weight of the base model once and do its FLOPs, so

    floor(B) = max(weight bytes / bandwidth, 2 * B * weight count / sgemm peak)

Rows: plain transformers (its nn.Linear, MKL) and loramux (``MultiLoraModel``: the decode GEMM kernel
on every linear, the grouped-LoRA kernel) at B1 and B16, base rows and rows over 4 adapters of
different ranks and targets; each step appends one token to a 128-token KV cache (cropped back before
the next), keeps the last position's logits (``logits_to_keep=1``). Medians over interleaved rounds.
Plain transformers steps on its ``DynamicCache`` (which re-concatenates every layer's keys and values
each step); loramux rows on the engine's ``RowsKV`` (written in place) with the engine's routing
(``prepare_routing`` once, as its decode batch does until a row joins or leaves), what ``loramux serve``
runs. "B16 mixed, names per call" is the library call with an ``adapter_names`` list instead, the same
names every step as a caller's own loop passes them (consecutive calls with the same names share one
resolution: ``routing.RecentRouting``).
The int8 rows (``quantize.quantize_model``: weight-only int8, per-output-channel scales) have their own
floor: their weight bytes (int8 + scales) / bandwidth, or the same FLOPs / sgemm peak.

    .venv/bin/python benchmarks/bench_core.py --steps-only     # this table alone (~3 min)
"""
from __future__ import annotations

import copy
import os
import statistics
import time
from pathlib import Path

import torch

from loramux import huge_pages
from loramux.engine.kv import RowsKV

CONTEXT = 128
TARGETS = {  # rank -> target modules: different ranks and different layers per adapter
    8: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    16: ["q_proj", "v_proj"],
    32: ["gate_proj", "up_proj", "down_proj"],
    64: ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"],
}


def make_mixed_adapters(base, root: Path) -> list[Path]:
    """4 PEFT adapters (ranks 8/16/32/64, targets as ``TARGETS``, non-zero B), saved under ``root``."""
    from peft import LoraConfig, get_peft_model

    paths = []
    for i, (rank, targets) in enumerate(TARGETS.items()):
        torch.manual_seed(200 + i)
        peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets,
                                                                    lora_dropout=0.0, init_lora_weights=False))
        path = root / f"m{i}_r{rank}"
        peft_model.save_pretrained(str(path))
        paths.append(path)
        del peft_model
    return paths


def weight_stats(model) -> tuple[int, int]:
    """(bytes, element count) of the weights a decode step reads: every nn.Linear's weight once (tied ones once);
    an int8 layer's ``qweight`` and ``wscale`` instead."""
    seen, count = {}, {}
    for module in model.modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        tensors = [module.qweight, module.wscale] if hasattr(module, "qweight") else [module.weight]
        for t in tensors:
            seen[t.data_ptr()] = t
        count[tensors[0].data_ptr()] = tensors[0].numel()
    return sum(w.numel() * w.element_size() for w in seen.values()), sum(count.values())


class Floor:
    """Streaming bandwidth (256 MiB sum) and sgemm peak (2048^3), sampled once per round."""

    def __init__(self) -> None:
        # 256 MiB of float32, on the same kind of pages as loramux's weights (huge pages where the system has them:
        # huge_pages.py), so the floor is the best streaming rate of the machine, not of 4 KiB pages
        huge = huge_pages.available()
        if huge:
            import numpy as np

            self.big = torch.from_numpy(np.empty(64 * 2**20, dtype=np.float32)).normal_()
        else:
            self.big = torch.empty(64 * 2**20).normal_()
        self.pages = "2 MiB pages" if huge else "4 KiB pages"
        self.a = torch.randn(2048, 2048)
        self.bw: list[float] = []
        self.peak: list[float] = []

    def sample(self, clock=time.perf_counter) -> None:
        t0 = clock()
        self.big.sum()
        self.bw.append(self.big.numel() * 4 / (clock() - t0))
        t0 = clock()
        torch.mm(self.a, self.a)
        self.peak.append(2 * 2048**3 / (clock() - t0))

    def seconds(self, batch: int, nbytes: int, count: int) -> float:  # noqa: D401 - the floor of one step
        bw, peak = statistics.median(self.bw), statistics.median(self.peak)
        return max(nbytes / bw, 2 * batch * count / peak)


def _step_calls(models: dict, rows: dict, generator_seed: int = 7) -> tuple[dict, dict]:
    """One decode-step closure per (label -> (model, batch, adapter_names)), each on its own KV cache."""
    calls, caches = {}, {}
    prefilled = {}
    for label, (model, batch, names) in rows.items():
        g = torch.Generator().manual_seed(generator_seed)
        ids = torch.randint(3, 49152, (batch, CONTEXT), generator=g)
        if batch not in prefilled:  # one prefill per batch size (on the plain model); runners copy it
            prefilled[batch] = models["plain"](input_ids=ids, use_cache=True, logits_to_keep=1).past_key_values
        caches[label] = copy.deepcopy(prefilled[batch]) if model == "plain" else RowsKV.from_cache(prefilled[batch])
        nxt = torch.randint(3, 49152, (batch, 1), generator=g)
        mask = torch.ones(batch, CONTEXT + 1, dtype=torch.long)
        pos = torch.full((batch, 1), CONTEXT, dtype=torch.long)
        extra = {} if names is None else {"adapter_names": names}
        calls[label] = (lambda m=models[model], k=label, nxt=nxt, mask=mask, pos=pos, extra=extra:
                        m(input_ids=nxt, attention_mask=mask, position_ids=pos, past_key_values=caches[k], use_cache=True,
                          logits_to_keep=1, **extra))
    return calls, caches


def bench_steps(base, reps: int, root: Path) -> dict:
    """The step table's measurements: seconds per step (median) per row, the floor's samples, weight stats."""
    from loramux import MultiLoraModel
    from loramux.quantize import quantize_model

    plain = base
    paths = make_mixed_adapters(plain, root)
    lm = MultiLoraModel(copy.deepcopy(base))
    base8 = copy.deepcopy(base)
    quantize_model(base8)
    lm8 = MultiLoraModel(base8)
    names, adapter_bytes = [], 0
    for path in paths:
        adapter_bytes += lm.load_adapter(path, adapter_name=path.name).nbytes
        lm8.load_adapter(path, adapter_name=path.name)
        names.append(path.name)
    mixed16 = [names[i % 4] for i in range(16)]
    # the engine's decode batch: rows resolved once (prepare_routing) and reused until a row joins or leaves
    served, served8 = lm.prepare_routing, lm8.prepare_routing
    rows = {"plain B1": ("plain", 1, None), "loramux B1 base": ("lm", 1, served(["__base__"])),
            "loramux B1 adapter r8": ("lm", 1, served([names[0]])),
            "plain B16": ("plain", 16, None), "loramux B16 base": ("lm", 16, served(["__base__"] * 16)),
            "loramux B16 mixed 4 adapters": ("lm", 16, served(mixed16)),
            "B16 mixed, names per call": ("lm", 16, mixed16),
            "int8 B1 base": ("lm8", 1, served8(["__base__"])), "int8 B16 mixed 4 adapters": ("lm8", 16, served8(mixed16))}
    nbytes, count = weight_stats(plain)
    nbytes8, _ = weight_stats(base8)
    with torch.inference_mode():
        calls, caches = _step_calls({"plain": plain, "lm": lm, "lm8": lm8}, rows)
        keys = list(calls)

        def run(k, clock):
            cache = caches[k]
            extra = cache.get_seq_length() - CONTEXT
            if isinstance(cache, RowsKV):  # its mask is not extended by a bare forward: crop(-1) kept CONTEXT - 1
                for layer in cache.layers:
                    layer.crop(CONTEXT)
            elif extra:
                cache.crop(-extra)
            t0 = clock()
            calls[k]()
            return clock() - t0

        def rounds(clock) -> dict:
            floor, times = Floor(), {k: [] for k in keys}
            for k in keys:  # warm-up: first-call costs, kernel loads
                run(k, clock), run(k, clock)
            for r in range(reps):
                floor.sample(clock)
                for k in keys[r % len(keys):] + keys[:r % len(keys)]:
                    times[k].append(run(k, clock))
            return {"times": {k: statistics.median(v) for k, v in times.items()}, "samples": times,
                    "bw": floor.bw, "peak": floor.peak, "nbytes": nbytes, "count": count, "nbytes8": nbytes8,
                    "adapter_bytes": adapter_bytes,  # the mixed rows read these too (their floor: informative)
                    "floor_mixed": floor.seconds(16, nbytes + adapter_bytes, count),
                    "floor": {b: floor.seconds(b, nbytes, count) for b in (1, 16)},
                    "floor8": {b: floor.seconds(b, nbytes8, count) for b in (1, 16)}, "load": os.getloadavg()[0],
                    "pages": floor.pages}

        res = rounds(time.perf_counter)
        # the same on one thread by that thread's CPU time, floor included: the work itself, which the
        # machine's other users cannot stretch (they stretch wall time and 2-thread syncs a lot)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            res["cpu"] = rounds(time.thread_time)
        finally:
            torch.set_num_threads(threads)
    return res


def step_rows(res: dict) -> list[tuple[str, str, str, str, bool | None]]:
    """(row, ms per step, / floor, target, met) for printing and BENCHMARKS.md."""
    t, fl = res["times"], res["floor"]
    targets = {"loramux B1 base": 1.3, "loramux B16 mixed 4 adapters": 2.0}
    out = []
    for label, seconds in t.items():
        batch = 16 if "B16" in label else 1
        ratio = seconds / (res["floor8"] if label.startswith("int8") else fl)[batch]
        target = targets.get(label)
        out.append((label, f"{seconds * 1e3:.1f}", f"{ratio:.2f}", f"<= {target}" if target else "",
                    None if target is None else ratio <= target))
    return out


def step_lines(res: dict) -> list[str]:
    bw, peak = statistics.median(res["bw"]), statistics.median(res["peak"])
    t = res["times"]
    return [f"floor: {res['nbytes'] / 2**20:.0f} MiB of weights per step at {bw / 1e9:.1f} GB/s (256 MiB sum() on "
            f"{res['pages']}, range {min(res['bw']) / 1e9:.1f}-{max(res['bw']) / 1e9:.1f}) = {res['floor'][1] * 1e3:.1f} ms at B1; "
            f"B16: max(that, {2 * 16 * res['count'] / 1e9:.1f} GFLOP at {peak / 1e9:.0f} GFLOP/s sgemm) = "
            f"{res['floor'][16] * 1e3:.1f} ms",
            f"B16 mixed also reads its 4 adapters' {res['adapter_bytes'] / 2**20:.0f} MiB (float32 A and B of every targeted "
            f"layer): with them the floor is {res['floor_mixed'] * 1e3:.1f} ms, and B16 mixed is "
            f"{t['loramux B16 mixed 4 adapters'] / res['floor_mixed']:.2f}x that (target 2 counts the base's bytes only)",
            f"int8 rows: {res['nbytes8'] / 2**20:.0f} MiB of int8 weights and scales = {res['floor8'][1] * 1e3:.1f} ms at B1, "
            f"{res['floor8'][16] * 1e3:.1f} ms at B16; int8 / fp32 loramux: B1 base "
            f"{t['int8 B1 base'] / t['loramux B1 base']:.2f}, B16 mixed "
            f"{t['int8 B16 mixed 4 adapters'] / t['loramux B16 mixed 4 adapters']:.2f}",
            f"loramux / plain transformers: B1 {t['plain B1'] / t['loramux B1 base']:.2f}x faster, "
            f"B16 {t['plain B16'] / t['loramux B16 base']:.2f}x faster (base rows); B16 mixed / B16 base "
            f"{t['loramux B16 mixed 4 adapters'] / t['loramux B16 base']:.2f}; with an adapter_names list per call "
            f"(consecutive calls with the same names share one resolution) / prepared routing (the engine's): "
            f"{t['B16 mixed, names per call'] / t['loramux B16 mixed 4 adapters']:.2f}"]
