"""The whole GAP path end to end on a built-in synthetic task and a tiny Qwen2.5-VL, on the CPU, no files needed.

Writes a task (84x84 PNGs of coloured squares, a train and an eval sample
file), makes a random tiny Qwen2.5-VL and a partly competent base model from
it (a short plain-text fine-tune), then runs the real stages on it: fit-pca
(a 95% head and a full-dim one), curate (N = 8), build-data, and trains the
paper's arms from the base model with the same steps: text-only,
output-as-input (no head, spans on every line), PCA all-latent, GAP (spans on
the hard lines only) and the full-dim head; eval of every arm with
calibration none and ema (accuracy, span rate, latents per line, latent /
visual norm at the spans that opened), and diagnose (output-as-input, GAP).
Everything goes into one folder: the stages' outputs in subfolders,
losses.png, accuracy.png, the diagnosis PNGs and report.md with the tables;
the arms' table is printed at the end. ``--seeds N`` runs N seeds into
OUT/seed-S/ and writes their mean ± spread (seeds.md, seeds.json). Rerun
with the same options to resume an interrupted run; a non-empty folder that
is not a demo of the same options is refused.
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
                        help="full (default: 6 to 8 minutes on 2 busy CPU cores) or small (a smoke test, "
                        "under a minute)")
    parser.add_argument("--seed", type=int, default=0, help="the task, the model's init, training and sampling")
    parser.add_argument("--seeds", type=int, default=1, metavar="N",
                        help="run N seeds (--seed, --seed+1, ...) into OUT/seed-S/ and report mean ± spread")


def run(args) -> int:
    from ..demo import FolderError, run_demo

    if args.seeds < 1:
        raise UsageError(f"--seeds: expected a count of at least 1, got {args.seeds}")
    try:
        if args.seeds > 1:
            from ..demo.seeds import run_seeds

            result = run_seeds(args.out, size=args.size, seed=args.seed, seeds=args.seeds)
            print()
            print(result["table"])
            print(f"wrote       {args.out}: seed-*/ (one demo each), seeds.md, seeds.json")
            return 0
        result = run_demo(args.out, size=args.size, seed=args.seed)
    except FolderError as exc:
        raise UsageError(str(exc)) from None
    print()
    print(result["table"])
    print()
    print(f"wall time   {result['wall'] / 60:.1f} min ({result['wall']:.0f} s) for the stages run now")
    print(f"wrote       {result['out']}: report.md, accuracy.png, losses.png, diagnose/*/diagnosis.png, demo.json, "
          "one folder per stage")
    return 0
