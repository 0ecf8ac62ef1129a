"""The ``gapkern`` commands of the GAP path, one module per stage (SPEC section 4).

Each stage module under ``gapkern.commands`` exposes ``NAME`` (the command), ``HELP`` (one
line), ``add_arguments(parser)`` and ``run(args) -> int``; ``gapkern.cli`` only dispatches.
Modules import torch and the model code inside ``run``, so ``gapkern --help`` stays fast.
A bad argument raises :class:`UsageError`: one line on stderr, exit status 2.
"""
from __future__ import annotations

import importlib

# gapkern.commands.<module>, in the order ``gapkern --help`` lists them
STAGES: tuple[str, ...] = ("fit_pca", "build_data", "curate", "train", "evaluate", "diagnose", "demo", "convert_tsv")


class UsageError(Exception):
    """A bad argument or input: printed as one line, exit status 2."""


def add_all(subparsers) -> None:
    """One subcommand per stage module."""
    for name in STAGES:
        module = importlib.import_module(f"{__name__}.{name}")
        parser = subparsers.add_parser(module.NAME, help=module.HELP, description=module.__doc__)
        module.add_arguments(parser)
        parser.set_defaults(run=module.run)
