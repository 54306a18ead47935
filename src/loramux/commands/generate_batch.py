"""``loramux generate --batch requests.jsonl``: a file of requests through the engine, results as JSONL.

One JSON object per input line::

    {"prompt": "Who works in Paris?", "adapter": "sql", "max_tokens": 64}
    {"id": "q2", "prompt": "...", "adapter": "./my-adapter", "temperature": 0.7, "seed": 1, "stop": ["\\n\\n"]}
    {"prompt": "<raw text>", "raw": true}                    # no chat template

``adapter``: a bundled adapter name, an adapter directory, or absent / ``__base__`` for the base
model. Sampling fields are those of ``SamplingParams`` (``max_tokens``, ``temperature``,
``top_p``, ``top_k``, ``seed``, ``stop``, ``stop_token_ids``, ``ignore_eos``); the default is
greedy. Prompts go through the chat template as one user turn, like single-prompt mode, unless
``raw``. Every input line yields one output line, in input order: ``id``, ``adapter``, ``text``,
``finish_reason`` (``stop``/``length``/``error``), ``prompt_tokens``, ``completion_tokens``,
``error``. A bad line (unknown adapter, prompt too long) is reported on its output line; the
others still run.
"""
from __future__ import annotations

import json
import sys
from typing import Any

_SAMPLING_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stop_token_ids", "ignore_eos")


def read_requests(path: str) -> list[dict[str, Any]]:
    """Parse the JSONL file; a malformed line is a SystemExit naming the line (nothing has run yet)."""
    stream = sys.stdin if path == "-" else open(path, encoding="utf-8")
    requests = []
    with stream:
        for lineno, line in enumerate(stream, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise SystemExit(f"loramux generate: {path}:{lineno}: not valid JSON ({exc})") from exc
            if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
                raise SystemExit(f"loramux generate: {path}:{lineno}: each line must be an object with a string 'prompt'")
            obj.setdefault("id", f"line-{lineno}")
            requests.append(obj)
    return requests


def run_batch(args: Any, load_model, resolve_adapter) -> int:
    """Run ``args.batch`` through an ``Engine``; ``load_model``/``resolve_adapter`` come from generate.py."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from loramux.engine import AdapterRegistry, Engine, SamplingParams
    from loramux.tasks.prompting import chat_prompt

    requests = read_requests(args.batch)
    registry = AdapterRegistry()
    names: list[str | None] = []
    errors: dict[int, str] = {}
    for i, req in enumerate(requests):
        try:
            name, path = resolve_adapter(str(req.get("adapter") or "__base__"))
        except SystemExit as exc:
            errors[i], name = str(exc), None
        else:
            if path is not None:
                registry.register(name, path)
        names.append(None if name == "__base__" else name)
    model, tokenizer = load_model(args)
    default_max = getattr(args, "max_new_tokens", 64)
    out = sys.stdout if args.output in (None, "-") else open(args.output, "w", encoding="utf-8")
    engine = Engine(model, tokenizer, registry=registry, max_running=args.max_running,
                    max_loaded_adapters=args.max_loaded_adapters)
    handles: dict[int, Any] = {}
    with engine, Progress(TextColumn("generating"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                          transient=False, console=_stderr_console()) as progress:
        task = progress.add_task("batch", total=len(requests))
        for i, req in enumerate(requests):
            if i in errors:
                continue
            try:
                fields = {k: req[k] for k in _SAMPLING_FIELDS if k in req}
                fields.setdefault("max_tokens", default_max)
                fields.setdefault("temperature", getattr(args, "temperature", 0.0))
                text = req["prompt"] if req.get("raw") else chat_prompt(tokenizer, req["prompt"])
                ids = tokenizer(text, add_special_tokens=bool(req.get("raw")))["input_ids"]
                handles[i] = engine.submit(ids, names[i], SamplingParams(**fields), request_id=str(req["id"]))
            except (ValueError, LookupError, TypeError, RuntimeError) as exc:
                errors[i] = f"{type(exc).__name__}: {exc}"
        progress.update(task, completed=len(errors))
        for i, req in enumerate(requests):  # results in input order, progress as they finish
            if i in errors:
                record = {"id": req["id"], "adapter": req.get("adapter"), "text": "", "finish_reason": "error",
                          "prompt_tokens": 0, "completion_tokens": 0, "error": errors[i]}
            else:
                res = handles[i].result()
                record = {"id": res.request_id, "adapter": req.get("adapter"), "text": res.text.strip(),
                          "finish_reason": res.finish_reason, "prompt_tokens": res.prompt_tokens,
                          "completion_tokens": res.completion_tokens, "error": res.error}
                progress.update(task, completed=len(errors) + sum(h.finished for h in handles.values()))
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
            out.flush()
        progress.update(task, completed=len(requests))
    if out is not sys.stdout:
        out.close()
    stats = engine.stats()
    _stderr_console().print(f"{len(requests)} requests, {stats['generated_tokens']} tokens generated, "
                            f"{len(errors)} refused, adapter loads {stats['loads']}, evictions {stats['evictions']}")
    return 1 if errors and len(errors) == len(requests) else 0


def _stderr_console():
    from rich.console import Console

    return Console(stderr=True)
