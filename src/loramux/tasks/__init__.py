"""Seeded synthetic tasks that the base model fails and a small LoRA learns in minutes on CPU.

Each task has a training split (for ``examples/train_adapters.py``) and a held-out split with other
names, values and templates (for ``loramux eval``, ``loramux demo`` and the end-to-end tests).
The bundled adapter for a task has the task's name (``src/loramux/adapters/<name>/``).
"""
from __future__ import annotations

from . import dates, json_extract, reverse, sql
from .core import SPLITS, Example, Pools, Task, is_correct, normalize
from .bundled import ADAPTERS_DIR, bundled_adapters, load_adapters, load_default
from .prompting import Generated, chat_prompt, generate_answers, generate_batch

TASKS: dict[str, Task] = {t.name: t for t in (json_extract.TASK, sql.TASK, reverse.TASK, dates.TASK)}


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise KeyError(f"unknown task {name!r}; tasks: {', '.join(TASKS)}") from None


__all__ = ["ADAPTERS_DIR", "SPLITS", "TASKS", "Example", "Generated", "Pools", "Task", "bundled_adapters", "chat_prompt",
           "generate_answers", "generate_batch", "get_task", "is_correct", "load_adapters", "load_default",
           "normalize"]
