"""The whole GAP path end to end on a built-in synthetic task and a tiny Qwen2.5-VL, on the CPU, no files needed.

Writes a task (84x84 PNGs of coloured squares, a train and an eval sample
file), makes a random tiny Qwen2.5-VL and a partly competent base model from
it (a short plain-text fine-tune), then runs the real stages on it: fit-pca,
curate (N = 8), build-data, train (GAP) and a text-only control with the same
steps, eval of base, text-only and GAP (calibration none and ema), each
fine-tune halfway and at the end, and diagnose (the GAP model, and the base
model as output-as-input). Everything goes into one folder: the stages'
outputs in subfolders, losses.png, the diagnosis PNGs and report.md with the
score table, which is printed at the end. Rerun with the same options to resume an interrupted run;
a non-empty folder that is not a demo of the same options is refused.
"""
from __future__ import annotations

from . import UsageError

NAME = "demo"
HELP = "the GAP path end to end on a built-in synthetic task and a tiny Qwen2.5-VL (CPU, minutes)"
SIZES = ("full", "small")


def add_arguments(parser) -> None:
    parser.add_argument("--out", default="gapkern-demo", metavar="DIR",
                        help="output folder (default ./gapkern-demo); an interrupted demo there resumes")
    parser.add_argument("--size", choices=SIZES, default="full",
                        help="full (default: about 3 minutes on 2 CPU cores) or small (a smoke test, under a minute)")
    parser.add_argument("--seed", type=int, default=0, help="the task, the model's init, training and sampling")


def run(args) -> int:
    from ..demo import FolderError, run_demo

    try:
        result = run_demo(args.out, size=args.size, seed=args.seed)
    except FolderError as exc:
        raise UsageError(str(exc)) from None
    print()
    print(result["table"])
    print()
    print(f"wall time   {result['wall'] / 60:.1f} min ({result['wall']:.0f} s) for the stages run now")
    print(f"wrote       {result['out']}: report.md, losses.png, diagnose/*/diagnosis.png, one folder per stage")
    return 0
