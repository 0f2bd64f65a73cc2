"""The ``convplus`` command: one entry point, one sub-command per module.

Each module listed in ``COMMANDS`` exposes ``register(subparsers)``, which adds its sub-parser and sets
``func`` (called with the parsed arguments, returning an exit code). Commands check their arguments, data
and model before they write anything and report bad input as ``ValueError``; ``main`` prints it as one line,
``convplus COMMAND: error: MESSAGE`` on stderr, and returns 2, as argparse does for bad flags.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

COMMANDS: tuple[str, ...] = (
    "convplus.train.cli",
    "convplus.train.sample",
    "convplus.models.convert",
    "convplus.ablation.cli",
    "convplus.info",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="convplus", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module_name in COMMANDS:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ValueError as error:  # bad input: the message says what to change; a traceback would not help
        message = " ".join(str(error).split())
        print(f"convplus {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
