"""The ``gapkern`` commands of the GAP path, one module per stage (SPEC section 4).

Each stage module under ``gapkern.commands`` exposes ``NAME`` (the command), ``HELP`` (one
line), ``add_arguments(parser)`` and ``run(args) -> int``; ``gapkern.cli`` only dispatches.
Modules import torch and the model code inside ``run``, so ``gapkern --help`` stays fast.
A bad argument raises :class:`UsageError`: one line on stderr, exit status 2.
"""
from __future__ import annotations

import importlib

from ..errors import UsageError  # noqa: F401  (in gapkern.errors: the library loaders raise it too)

# gapkern.commands.<module>, in the order ``gapkern --help`` lists them
STAGES: tuple[str, ...] = ("fit_pca", "build_data", "curate", "train", "evaluate", "diagnose", "demo")


def add_all(subparsers) -> None:
    """One subcommand per command module: ``generate``, then the stages."""
    for name in ("generate", *STAGES):  # generate first: it needs no sample file
        module = importlib.import_module(f"{__name__}.{name}")
        parser = subparsers.add_parser(module.NAME, help=module.HELP, description=getattr(module, "DESCRIPTION", module.__doc__))
        module.add_arguments(parser)
        parser.set_defaults(run=module.run)
