"""`loramux inspect DIR`: what an adapter directory holds, read and validated without any base model."""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="+", help="PEFT adapter directories")
    parser.add_argument("--allow-pickle", action="store_true", help="also read adapter_model.bin (runs pickle code)")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from loramux.adapter import read_adapter
    from loramux.errors import AdapterError

    console, status = Console(), 0
    for path in args.paths:
        try:
            adapter = read_adapter(path, allow_pickle=args.allow_pickle)
        except AdapterError as exc:
            console.print(f"[red]{type(exc).__name__}[/red]: {exc}")
            status = 1
            continue
        cfg = adapter.config
        table = Table(title=f"{path}  (r={cfg.r}, alpha={cfg.lora_alpha}{', rsLoRA' if cfg.use_rslora else ''}"
                            f"{', DoRA' if cfg.use_dora else ''}, {adapter.nbytes / 1e6:.2f} MB)")
        table.add_column("module", overflow="fold")  # never cut a module name
        for column in ("rank", "scaling", "A", "B", "extras"):
            table.add_column(column)
        for name, mw in sorted(adapter.modules.items()):
            if mw.lora_A is None:
                continue
            extras = ", ".join(k for k, t in (("bias", mw.lora_B_bias), ("magnitude", mw.magnitude)) if t is not None)
            table.add_row(name, str(mw.lora_A.shape[0]), f"{cfg.scaling_for(name):.4g}", str(tuple(mw.lora_A.shape)),
                          str(tuple(mw.lora_B.shape)), extras)
        for key, tensor in sorted(adapter.extra.items()):
            table.add_row(key, "", "", "", "", f"modules_to_save {tuple(tensor.shape)}")
        console.print(table)
    return status
