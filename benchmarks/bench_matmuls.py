"""The decode GEMM kernel alone: the default model's 210 layer matmuls at M rows, kernel against MKL (issue 13).

Why: the step table (bench_steps.py) times whole steps; to change the kernel's tiles one needs the matmuls
alone, streamed as a step streams them (each weight once per round, 405 MiB, the vocabulary projection left
out) and cache-resident (one layer's 7 weights 30 times: 13.5 MiB, which stays in a large L3), the second
telling the tile's compute rate from its overlap with the memory stream. Kernel and MKL alternate round by
round in one process; medians. A candidate kernel build can be put beside the installed one with
``--candidate module`` (an importable extension with the same ``decode_linear`` / ``int8_linear``): its
outputs are checked bit for bit against the installed kernel's first.

    .venv/bin/python benchmarks/bench_matmuls.py --rows 16 --threads 2
    .venv/bin/python benchmarks/bench_matmuls.py --rows 16 --threads 1 --int8 --resident
"""
from __future__ import annotations

import argparse
import importlib
import statistics
import time

import torch

from bench_common import build_base
from loramux import dense_kernel
from loramux.quantize import quantize_weight


def layer_weights(resident: bool) -> list[torch.Tensor]:
    """The 210 layer weights of the default model's shape (fresh random values), or layer 0's 7 repeated 30 times."""
    model = build_base()
    weights = [m.weight.detach() for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and "lm_head" not in name]
    return weights[:7] * 30 if resident else weights


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=16, help="rows of x per matmul (a decode step's batch)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--int8", action="store_true", help="weight-only int8 (per-output-channel scales)")
    parser.add_argument("--resident", action="store_true", help="one layer's weights repeated: cache-resident")
    parser.add_argument("--candidate", action="append", default=[], help="an importable kernel build to compare")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    kernel = dense_kernel.load()
    if kernel is None:
        raise SystemExit("the decode GEMM kernel is not available on this machine (see dense_kernel.py)")
    kernels = {"kernel": kernel, **{name: importlib.import_module(name) for name in args.candidate}}
    weights = layer_weights(args.resident)
    by_matrix = {w.data_ptr(): quantize_weight(w) for w in weights} if args.int8 else {}
    quantized = [by_matrix[w.data_ptr()] for w in weights] if args.int8 else []  # resident int8 reuses its 7 too
    xs = {k: torch.randn(args.rows, k) for k in {w.shape[1] for w in weights}}
    rows, max_rows = args.rows, dense_kernel.MAX_ROWS  # above MAX_ROWS a step takes MKL, and so does this

    def matmuls(module) -> list[torch.Tensor]:
        if module is None:  # MKL on the float32 weights (with --int8 too: the fp32 model's figure)
            return [torch.nn.functional.linear(xs[w.shape[1]], w) for w in weights]
        if args.int8:
            return [module.int8_linear(xs[q.shape[1]], q, s, None, max_rows) for q, s in quantized]
        return [module.decode_linear(xs[w.shape[1]], w, None, max_rows) for w in weights]

    clock = time.perf_counter if args.threads > 1 else time.thread_time  # 1 thread: its CPU time, load-proof
    names = [*kernels, "mkl"]
    with torch.inference_mode():
        reference = matmuls(kernel)
        for name in args.candidate:
            for i, (want, got) in enumerate(zip(reference, matmuls(kernels[name]))):
                if not torch.equal(want, got):
                    raise SystemExit(f"{name}: matmul {i} differs from the installed kernel's "
                                     f"(max {(want - got).abs().max():.3g}): not the same accumulator chain")
        times: dict[str, list[float]] = {name: [] for name in names}
        for r in range(args.rounds + 2):  # two warm-up rounds
            for name in names[r % len(names):] + names[:r % len(names)]:
                t0 = clock()
                matmuls(kernels.get(name))
                if r >= 2:
                    times[name].append(clock() - t0)
    nbytes = sum(q.numel() + s.numel() * 4 for q, s in quantized) if args.int8 else sum(w.numel() * 4 for w in weights)
    flops = 2 * rows * sum(w.numel() for w in weights)
    distinct = len({w.data_ptr() for w in weights})
    print(f"{len(weights)} matmuls of {rows} rows, {'int8' if args.int8 else 'fp32'}, {nbytes / 2**20:.0f} MiB of "
          f"weights read per round from {distinct} distinct matrices ({'resident' if args.resident else 'streamed'}), "
          f"{args.threads} thread(s), {args.rounds} rounds")
    for name in names:
        seconds = statistics.median(times[name])
        print(f"  {name:12s} {seconds * 1e3:7.2f} ms  {flops / seconds / 1e9:6.1f} GFLOP/s  "
              f"{nbytes / seconds / 1e9:5.1f} GB/s of weights read  (min {min(times[name]) * 1e3:.2f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
