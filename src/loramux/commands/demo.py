"""`loramux demo`: one mixed batch on the embedded default model and its bundled adapters.

Every row of the batch names its own adapter (one row names ``__base__``, the model without any),
all rows run in the same forward passes, and the table shows each answer next to the answer the
task expects. Then the memory picture: one base plus small adapters instead of a full copy each.
"""
from __future__ import annotations

import argparse
import time


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", default=None, help="base model: a transformers directory or a .gguf file "
                        "(default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--adapter-dir", default=None, help="directory of adapter directories (default: the bundled ones)")
    parser.add_argument("--seed", type=int, default=0, help="which held-out prompts to show")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    console = Console()
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        step = progress.add_task("importing torch and transformers", total=None)
        import torch
        from transformers.utils import logging as hf_logging

        from loramux import BASE_ADAPTER, MultiLoraModel
        from loramux.base import load_base, needs_conversion
        from loramux.tasks import TASKS, bundled_adapters, generate_batch, is_correct, load_adapters

        if args.threads:
            torch.set_num_threads(args.threads)
        adapters = bundled_adapters(args.adapter_dir)
        if not adapters:
            console.print(f"[red]no adapters found in {args.adapter_dir or 'the package'}[/red]")
            return 1
        convert = needs_conversion(args.base)
    load_start = time.perf_counter()
    if convert:  # outside the live display: the conversion draws its own progress bars (~1 min, once)
        console.print("[bold]First run:[/bold] converting the embedded base model once into a safetensors cache "
                      "(later runs load it in about a second)")
        hf_model, tokenizer = load_base(args.base)
    hf_logging.disable_progress_bar()  # transformers' per-tensor bars: ours cover the rest
    with Progress(*columns, console=console, transient=True) as progress:
        step = progress.add_task("loading the base model", total=None)
        if not convert:
            hf_model, tokenizer = load_base(args.base)
        model = MultiLoraModel(hf_model)
        progress.update(step, description="loading adapters", total=len(adapters), completed=0)
        load_adapters(model, adapters, on_adapter=lambda name: progress.advance(step))
        load_s = time.perf_counter() - load_start

        # one held-out prompt per adapter whose task we know, plus the first prompt again on the bare base
        rows = []
        for name in adapters:
            task = TASKS.get(name)
            example = task.examples("heldout", 1, seed=args.seed)[0] if task else None
            rows.append((name, example.prompt if example else "Hello! Who are you?", example.answer if example else None))
        rows.append((BASE_ADAPTER, rows[0][1], rows[0][2]))
        max_new = max((TASKS[n].max_new_tokens for n in adapters if n in TASKS), default=32)
        progress.update(step, description=f"generating one mixed batch of {len(rows)} rows", total=None, completed=0)
        gen_start = time.perf_counter()
        outputs = generate_batch(model, tokenizer, [p for _, p, _ in rows], max_new_tokens=max_new,
                                 adapter_names=[a for a, _, _ in rows])
        gen_s = time.perf_counter() - gen_start

    _print_batch(console, rows, outputs, gen_s, load_s, is_correct)
    _print_memory(console, model.memory_report(), model.dtype)
    return 0


def _print_batch(console, rows, outputs, gen_s: float, load_s: float, is_correct) -> None:
    from rich.table import Table

    table = Table(title=f"One mixed batch: {len(rows)} rows, each with its own adapter, in the same forward passes",
                  show_lines=True)
    table.add_column("adapter", style="bold cyan", no_wrap=True)
    table.add_column("prompt", ratio=3)
    table.add_column("answer", ratio=3)
    table.add_column("ok", justify="center")
    table.add_column("tokens/s", justify="right")
    for (adapter, prompt, expected), out in zip(rows, outputs):
        mark = "" if expected is None else ("[green]✓[/green]" if is_correct(out.text, expected) else "[red]✗[/red]")
        answer = out.text if len(out.text) <= 160 else out.text[:157] + "..."
        table.add_row(adapter, prompt, answer, mark, f"{out.n_tokens / gen_s:.1f}")
    console.print(table)
    total_tokens = sum(o.n_tokens for o in outputs)
    console.print(f"batch: {total_tokens} new tokens in {gen_s:.2f} s = {total_tokens / gen_s:.1f} tokens/s "
                  f"(greedy; each row's tokens/s is its tokens over the shared batch time); "
                  f"model + adapters loaded in {load_s:.1f} s")


def _print_memory(console, report: dict, dtype) -> None:
    from rich.table import Table

    n = len(report["adapters"])
    table = Table(title="Memory: one shared base + small adapters, instead of one full fine-tuned copy per adapter")
    table.add_column("what")
    table.add_column("bytes", justify="right")
    table.add_column("", justify="right")
    table.add_row(f"base model ({dtype})", f"{report['base_bytes']:,}", _mb(report["base_bytes"]))
    for name, nbytes in report["adapters"].items():
        table.add_row(f"  adapter {name}", f"{nbytes:,}", _mb(nbytes))
    table.add_row("[bold]total in memory[/bold]", f"[bold]{report['total_bytes']:,}[/bold]", _mb(report["total_bytes"]))
    table.add_row(f"{n} full fine-tuned copies", f"{report['full_copies_bytes']:,}", _mb(report["full_copies_bytes"]))
    table.add_row("[bold]saving[/bold]", "", f"[bold green]{report['saving_ratio']:.2f}x[/bold green]")
    console.print(table)


def _mb(nbytes: int) -> str:
    return f"{nbytes / 2**20:,.1f} MiB"
