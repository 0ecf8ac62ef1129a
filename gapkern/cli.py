"""The ``gapkern`` command: one subcommand per module of :mod:`gapkern.commands` (``generate`` and the stages)."""
from __future__ import annotations

import argparse
import sys

from .commands import UsageError, add_all


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gapkern", description="GAP visual latent reasoning for Qwen2.5-VL.")
    add_all(parser.add_subparsers(dest="command", metavar="COMMAND"))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return args.run(args)
    except UsageError as exc:
        print(f"gapkern {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
