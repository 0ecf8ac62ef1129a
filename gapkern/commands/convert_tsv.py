"""Convert a VLMEvalKit benchmark TSV into a SPEC 4.1 sample file: OUT (JSONL) and its PNGs in OUT_STEM.images/.

The TSV's base64 images (and rows that share another row's image) are
decoded once; task is the benchmark's name (the TSV's stem, or --task),
category from gapkern's table (HRBench4K, HRBench8K, MMStar,
MME-RealWorld-Lite, MathVista_MINI, WeMath) or --category; the TSV's other
columns go under "meta". Any stage reads the TSV itself too: this is for
training files and for looking at the lines.
"""
from __future__ import annotations

import os

from . import UsageError

NAME = "convert-tsv"
HELP = "convert a VLMEvalKit benchmark TSV into a sample file (JSONL + PNGs)"


def add_arguments(parser) -> None:
    parser.add_argument("--tsv", required=True, metavar="FILE", help="the VLMEvalKit TSV (e.g. HRBench4K.tsv)")
    parser.add_argument("--out", required=True, metavar="FILE", help="the sample file to write (JSONL)")
    parser.add_argument("--task", metavar="NAME", help="the task name (default: the TSV's file name without .tsv)")
    parser.add_argument("--category", choices=("perception", "reasoning"),
                        help="the task's category where gapkern's table does not know its name")


def run(args) -> int:
    from ..data.benchfiles import convert_tsv

    if os.path.isdir(args.out):
        raise UsageError(f"--out: {args.out!r} is a folder; expected a file name")
    try:
        summary = convert_tsv(args.tsv, args.out, task=args.task, category=args.category)
    except FileNotFoundError:
        raise UsageError(f"--tsv: no file at {args.tsv!r}") from None
    except (OSError, ValueError) as exc:
        raise UsageError(f"--tsv: {exc}") from None
    print(f"lines       {summary['lines']} ({summary['task']}, {summary['category']})")
    print(f"wrote       {args.out}, images in {summary['images']}")
    return 0
