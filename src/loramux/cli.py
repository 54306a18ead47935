"""`loramux` command line: one sub-command per module, imported only when it runs.

Each sub-command module exposes ``add_arguments(parser)`` and ``run(args) -> int``. Their
module-level imports stay light (no torch) so that ``loramux --help`` answers at once.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

# sub-command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("loramux.commands.demo", "one mixed batch on the embedded default model and its bundled adapters"),
    "generate": ("loramux.commands.generate", "generate with one adapter, or a JSONL batch through the engine"),
    "serve": ("loramux.server.command", "OpenAI-compatible HTTP server"),
    "eval": ("loramux.commands.evaluate", "score the base model and every adapter on every task"),
    "inspect": ("loramux.commands.inspect", "print what an adapter directory holds, without loading a model"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loramux", description="Many LoRA adapters on one shared base model.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:  # a sub-command whose optional dependencies are missing
            sub_parser.set_defaults(_missing=f"{name}: {exc}")
            continue
        module.add_arguments(sub_parser)
        sub_parser.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if getattr(args, "_missing", None):
        logging.getLogger("loramux").error("cannot run %s (pip install 'loramux[server,plot]')", args._missing)
        return 2
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
