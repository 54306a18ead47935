"""`loramux eval`: the base model and every adapter scored on every task's held-out split.

The whole (base + adapters) x tasks matrix runs as mixed batches: each batch holds prompts of one
task (so one ``max_new_tokens``) and, for each prompt, one row per model, so every forward pass
serves all the adapters and the base at once. Scores are exact matches after whitespace
normalisation. A sample of rows is then generated again with its adapter alone (batch of one)
to check that sharing a batch changes no answer. Writes the matrix as JSON and as a PNG heatmap.

Exit status 0 when every adapter reaches ``--target-adapter`` on its own task, the base model
stays at or under ``--target-base`` on every task, and every sampled answer matches its solo run.
"""
from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--n", type=int, default=100, help="held-out prompts per task (default 100)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the held-out prompts and of the solo sample")
    parser.add_argument("--batch-prompts", type=int, default=8,
                        help="prompts per batch; each batch has one row per prompt per model (default 8)")
    parser.add_argument("--solo-sample", type=int, default=2, help="rows per (model, task) cell re-run alone (default 2)")
    parser.add_argument("--tasks", nargs="+", default=None, help="tasks to score (default: all)")
    parser.add_argument("--base", default=None, help="base model directory or .gguf (default: the embedded one)")
    parser.add_argument("--adapter-dir", default=None, help="directory of adapter directories (default: the bundled ones)")
    parser.add_argument("--out", default="eval", help="output directory for eval.json and eval.png (default ./eval)")
    parser.add_argument("--target-adapter", type=float, default=0.90)
    parser.add_argument("--target-base", type=float, default=0.10)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--base-dtype", default=None, choices=["float32", "int8"],
                        help="int8: weight-only int8 base (per-channel scales), the quality gate of loramux.quantize")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn, \
        TimeRemainingColumn

    console = Console()
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        step = progress.add_task("importing torch and transformers", total=None)
        import torch

        from loramux import BASE_ADAPTER, MultiLoraModel
        from loramux.base import load_base
        from loramux.tasks import TASKS, bundled_adapters, generate_batch, get_task, is_correct, load_adapters

        if args.threads:
            torch.set_num_threads(args.threads)
        adapters = bundled_adapters(args.adapter_dir)
        tasks = [get_task(t) for t in (args.tasks or TASKS)]
        progress.update(step, description="loading the base model")
        hf_model, tokenizer = load_base(args.base, dtype=args.base_dtype)
        model = MultiLoraModel(hf_model)
        progress.update(step, description="loading adapters", total=len(adapters), completed=0)
        load_adapters(model, adapters, on_adapter=lambda name: progress.advance(step))
        models = [BASE_ADAPTER, *adapters]

        # rows: (model, task, example); a batch = `batch_prompts` prompts of one task x every model
        batches = []
        examples = {t.name: t.examples("heldout", args.n, seed=args.seed) for t in tasks}
        for task in tasks:
            exs = examples[task.name]
            for i in range(0, len(exs), args.batch_prompts):
                batches.append((task, [(m, ex) for ex in exs[i:i + args.batch_prompts] for m in models]))
        progress.update(step, description="mixed batches", total=sum(len(rows) for _, rows in batches), completed=0)
        answers: dict[tuple[str, str, str], str] = {}  # (model, task, prompt) -> answer
        start = time.perf_counter()
        for task, rows in batches:
            outs = generate_batch(model, tokenizer, [ex.prompt for _, ex in rows], max_new_tokens=task.max_new_tokens,
                                  adapter_names=[m for m, _ in rows])
            for (m, ex), out in zip(rows, outs):
                answers[(m, task.name, ex.prompt)] = out.text
            progress.advance(step, len(rows))
        mixed_s = time.perf_counter() - start

        rng = random.Random(f"loramux-eval-solo:{args.seed}")
        sample = [(m, t, ex) for t in tasks for m in models
                  for ex in rng.sample(examples[t.name], min(args.solo_sample, len(examples[t.name])))]
        progress.update(step, description="solo re-runs of a sample", total=len(sample), completed=0)
        mismatches = []
        for m, t, ex in sample:
            solo = generate_batch(model, tokenizer, [ex.prompt], max_new_tokens=t.max_new_tokens, adapter_names=[m])[0].text
            mixed = answers[(m, t.name, ex.prompt)]
            if solo != mixed:
                mismatches.append({"model": m, "task": t.name, "prompt": ex.prompt, "mixed": mixed, "solo": solo})
            progress.advance(step)

    matrix = {m: {t.name: sum(is_correct(answers[(m, t.name, ex.prompt)], ex.answer) for ex in examples[t.name])
                  / len(examples[t.name]) for t in tasks} for m in models}
    failures = {m: {t.name: [{"prompt": ex.prompt, "expected": ex.answer, "answer": answers[(m, t.name, ex.prompt)]}
                             for ex in examples[t.name]
                             if not is_correct(answers[(m, t.name, ex.prompt)], ex.answer)][:5]
                    for t in tasks if m in (BASE_ADAPTER, t.name)} for m in models}
    checks = _targets(matrix, tasks, models, BASE_ADAPTER, args)
    result = {
        "n_per_task": args.n, "seed": args.seed, "models": models, "tasks": [t.name for t in tasks],
        "matrix": matrix, "targets": {"adapter_on_own_task": args.target_adapter, "base_on_every_task": args.target_base},
        "checks": checks, "mixed_vs_solo": {"checked": len(sample), "equal": len(sample) - len(mismatches),
                                             "mismatches": mismatches},
        "rows": len(answers), "mixed_batches_seconds": round(mixed_s, 1), "torch_threads": torch.get_num_threads(),
        "first_failures": failures,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(result, indent=2))
    _heatmap(matrix, models, [t.name for t in tasks], out / "eval.png")
    _print(console, result, models, tasks, out)
    ok = all(c["passed"] for c in checks) and not mismatches
    return 0 if ok else 1


def _targets(matrix, tasks, models, base_name, args) -> list[dict]:
    checks = []
    for t in tasks:
        if t.name in models:
            acc = matrix[t.name][t.name]
            checks.append({"what": f"adapter {t.name} on {t.name}", "value": acc, "target": f">= {args.target_adapter}",
                           "passed": acc >= args.target_adapter})
        acc = matrix[base_name][t.name]
        checks.append({"what": f"{base_name} on {t.name}", "value": acc, "target": f"<= {args.target_base}",
                       "passed": acc <= args.target_base})
    return checks


def _print(console, result: dict, models, tasks, out: Path) -> None:
    from rich.table import Table

    table = Table(title=f"Exact match on {result['n_per_task']} held-out prompts per task (rows: model, columns: task)")
    table.add_column("model \\ task", style="bold cyan")
    for t in tasks:
        table.add_column(t.name, justify="right")
    for m in models:
        cells = []
        for t in tasks:
            acc = result["matrix"][m][t.name]
            style = "bold green" if m == t.name else ("red" if acc > result["targets"]["base_on_every_task"] else "")
            cells.append(f"[{style}]{acc:.0%}[/{style}]" if style else f"{acc:.0%}")
        table.add_row(m, *cells)
    console.print(table)
    for c in result["checks"]:
        mark = "[green]pass[/green]" if c["passed"] else "[red]FAIL[/red]"
        console.print(f"  {mark}  {c['what']}: {c['value']:.0%} (target {c['target']})")
    mv = result["mixed_vs_solo"]
    mark = "[green]pass[/green]" if mv["equal"] == mv["checked"] else "[red]FAIL[/red]"
    console.print(f"  {mark}  mixed-batch answers equal to solo runs: {mv['equal']}/{mv['checked']} sampled rows")
    console.print(f"{result['rows']} rows in mixed batches in {result['mixed_batches_seconds']} s "
                  f"({result['torch_threads']} threads); wrote {out / 'eval.json'} and {out / 'eval.png'}")


def _heatmap(matrix, models, task_names, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    values = [[matrix[m][t] * 100 for t in task_names] for m in models]
    fig, ax = plt.subplots(figsize=(1.4 * len(task_names) + 2, 0.6 * len(models) + 1.6))
    image = ax.imshow(values, cmap="viridis", vmin=0, vmax=100)
    ax.set_xticks(range(len(task_names)), task_names)
    ax.set_yticks(range(len(models)), models)
    ax.set_xlabel("task (held-out prompts)")
    ax.set_ylabel("model")
    for i, row in enumerate(values):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.0f}%", ha="center", va="center", color="black" if v > 50 else "white")
    fig.colorbar(image, ax=ax, label="exact match %")
    ax.set_title("loramux eval: adapters x tasks")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
