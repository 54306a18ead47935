"""`loramux generate`: try one adapter by hand, or run a JSONL batch of requests.

    loramux generate --adapter sql "SQL for the employees table: Who works in Paris?"
    loramux generate --adapter ./my-adapter "..."      # any PEFT adapter directory
    loramux generate --adapter __base__ "..."          # the base model alone
    loramux generate --batch requests.jsonl --output results.jsonl   # many requests through the engine

The prompt goes through the tokenizer's chat template as one user turn (the format the bundled
adapters were trained on); decoding is greedy unless ``--temperature`` is given.
"""
from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", nargs="?", default=None, help="the user message (single-adapter mode)")
    parser.add_argument("--adapter", default="__base__",
                        help="a bundled adapter name, an adapter directory, or __base__ (default)")
    parser.add_argument("--base", default=None, help="base model directory or .gguf (default: the embedded one)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    batch = parser.add_argument_group("batch mode (continuous batching through the engine; see loramux.commands.generate_batch)")
    batch.add_argument("--batch", metavar="FILE", default=None,
                       help="JSONL requests, one per line: {\"prompt\": ..., \"adapter\": ..., \"max_tokens\": ...}; - for stdin")
    batch.add_argument("--output", metavar="FILE", default=None, help="JSONL results in input order (default: stdout)")
    batch.add_argument("--max-running", type=int, default=16, help="sequences decoded together (default 16)")
    batch.add_argument("--max-loaded-adapters", type=int, default=32, help="adapters resident at once (default 32)")


def run(args: argparse.Namespace) -> int:
    if args.batch is not None:
        from loramux.commands.generate_batch import run_batch

        return run_batch(args, _load_model, _resolve_adapter)
    if args.prompt is None:
        from rich.console import Console

        Console(stderr=True).print("loramux generate: give a prompt, e.g. loramux generate --adapter json "
                                   "\"Extract the person as JSON: Maria is 34 and lives in Lisbon.\"", markup=False)
        return 2
    return _run_single(args)


def _resolve_adapter(spec: str) -> tuple[str, Path | None]:
    """``(adapter_name, directory)``: ``__base__`` needs no directory; a bundled name or a path does."""
    from loramux import BASE_ADAPTER
    from loramux.tasks import bundled_adapters

    if spec == BASE_ADAPTER:
        return BASE_ADAPTER, None
    bundled = bundled_adapters()
    if spec in bundled:
        return spec, bundled[spec]
    path = Path(spec).expanduser()
    if (path / "adapter_config.json").is_file():
        return path.resolve().name, path
    raise SystemExit(f"loramux generate: --adapter {spec!r} is neither a bundled adapter "
                     f"({', '.join(bundled) or 'none installed'}), nor an adapter directory, nor __base__")


def _load_model(args: argparse.Namespace):
    """The base model wrapped in a ``MultiLoraModel``, with a spinner while it loads."""
    from rich.console import Console

    console = Console(stderr=True)
    with console.status("loading the base model (the first run converts it once, ~1 min)"):
        import torch

        from loramux import MultiLoraModel
        from loramux.base import load_base

        if args.threads:
            torch.set_num_threads(args.threads)
        hf_model, tokenizer = load_base(args.base)
    return MultiLoraModel(hf_model), tokenizer


def _run_single(args: argparse.Namespace) -> int:
    name, path = _resolve_adapter(args.adapter)
    model, tokenizer = _load_model(args)
    if path is not None:
        model.load_adapter(path, adapter_name=name)
    from loramux.tasks import generate_batch

    sampling = {} if args.temperature <= 0 else {"do_sample": True, "temperature": args.temperature}
    text = generate_batch(model, tokenizer, [args.prompt], max_new_tokens=args.max_new_tokens,
                          adapter_names=[name], **sampling)[0].text
    from rich.console import Console

    Console(soft_wrap=True).print(text, markup=False, highlight=False)  # the answer as it is: no markup, no wrapping
    return 0
