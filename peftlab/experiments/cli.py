"""The ``peftlab`` command: one sub-command per job (compare, memory, ...)."""

from __future__ import annotations

import argparse
import importlib
import sys

# Modules that add a sub-command: each defines ``add_cli(subparsers)`` setting ``func`` on its parser.
SUBCOMMAND_MODULES = ["peftlab.experiments.cli_compare", "peftlab.experiments.memory"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peftlab", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
            continue  # a sub-command whose module is not written yet
        module.add_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ValueError as e:  # bad input: one clear line, no traceback
        print(f"peftlab {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
