"""The ``convplus`` command: one entry point, one sub-command per module.

Each module listed in ``COMMANDS`` exposes ``register(subparsers)``, which adds its sub-parser and sets
``func`` (called with the parsed arguments, returning an exit code).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

COMMANDS: tuple[str, ...] = ("convplus.train.cli", "convplus.models.convert", "convplus.ablation.cli", "convplus.info")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="convplus", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module_name in COMMANDS:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
