"""The ``gapkern`` command: one subcommand per module of :mod:`gapkern.commands` (``generate`` and the stages)."""
from __future__ import annotations

import argparse
import errno
import os
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
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        print(f"gapkern {args.command}: error: {_no_space(exc, args)}", file=sys.stderr)
        return 2


def _no_space(exc: OSError, args) -> str:
    """One line for a write that found the device full: gapkern's own (it names the folder), or an OSError
    from elsewhere, named by its file or else by --out."""
    from ._io import no_space

    if str(exc.strerror).startswith("no space left on device writing into"):
        return exc.strerror
    out = getattr(args, "out", None)
    if exc.filename:
        folder = os.path.dirname(os.path.abspath(os.fsdecode(exc.filename)))
    elif out and os.path.isdir(out):
        folder = out
    else:
        folder = os.path.dirname(os.path.abspath(out or "."))
    return no_space(folder).strerror


if __name__ == "__main__":
    sys.exit(main())
