"""Capacity filter (SPEC 4.4): sample the base model N times per question; a line is hard when no attempt is right.

Prompts are the question (and choices) with the line's images, through the
tokenizer's chat template (gapkern.data.prompts); attempts come from the patched,
batched generate, each line's drawn with seeds derived from --seed and its
id; answers are judged by gapkern.evaluate. OUT gets every input line (image
paths absolute) plus "attempts", "n_correct" and "hard". Results are appended
line by line under OUT.parts/ while the run goes: killed and rerun with the
same options, it continues where it stopped and ends with the same OUT as an
uninterrupted run. Under torchrun the ranks split the lines.
"""
from __future__ import annotations

import os

from . import UsageError
from ._common import (add_model_arguments, check_temperature, load_model, load_tokenizer, positive_int, read_samples,
                      start)

NAME = "curate"
HELP = "sample the base model N times per question and mark the lines it always misses as hard"


def add_arguments(parser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--samples", required=True, metavar="FILE", help="the sample file (JSONL, SPEC 4.1)")
    parser.add_argument("--out", required=True, metavar="FILE", help="the curated sample file to write (JSONL)")
    # --n alone would break under torchrun: its own parser takes --n for an ambiguous prefix of --nnodes / ...
    parser.add_argument("--attempts", "--n", dest="n", type=int, default=8, metavar="N",
                        help="attempts per question, N in SPEC 4.4 (default 8; --n works without torchrun)")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0; 0: greedy)")
    parser.add_argument("--max-new-tokens", type=int, default=512, metavar="N",
                        help="new tokens per attempt (default 512)")
    parser.add_argument("--batch", type=int, default=8, metavar="LINES",
                        help="questions per generate call, N rows each (default 8)")
    parser.add_argument("--seed", type=int, default=0, help="run seed; each line's attempts derive from it and the id")


def _check(args) -> None:
    for option in ("attempts", "max_new_tokens", "batch"):
        positive_int(getattr(args, "n" if option == "attempts" else option), "--" + option.replace("_", "-"))
    check_temperature(args.temperature)
    if os.path.isdir(args.out):
        raise UsageError(f"--out: {args.out!r} is a folder; expected a file name")


def _prepare(model, tokenizer):
    """Patch a plain model for the latent-aware generate; returns the ids it must not sample (it was never
    trained to write latents). A gapkern checkpoint is ready as loaded: its head, GapConfig and running target."""
    from ._gap import KEEP_HEAD, prepare

    if "gap" in model._modules:
        return []
    prepare(model, tokenizer, KEEP_HEAD)  # the gap profile's tokens, output-as-input
    return [model.gap.config.latent_start_id]  # always: prepare suppresses it only when its tokens are new


def run(args) -> int:
    from .. import distributed
    from ..stages.curate import ResumeError, curate
    from ..data.images import image_settings

    _check(args)
    samples = read_samples(args.samples)
    place = start(args)
    try:
        tokenizer = load_tokenizer(args.model)
        model = load_model(args.model, place)
        suppress = _prepare(model, tokenizer)
        try:
            summary = curate(model, tokenizer, samples, args.out, n=args.n, temperature=args.temperature,
                             max_new_tokens=args.max_new_tokens, batch=args.batch, seed=args.seed,
                             settings=image_settings(args.model), suppress=suppress,
                             identity={"model": os.path.abspath(args.model)})
        except ResumeError as exc:
            raise UsageError(f"--out: {str(exc).removeprefix('out: ')}") from None
    finally:
        distributed.close()
    if place.rank == 0:
        lines, hard = summary["lines"], summary["hard"]
        print(f"hard        {hard} of {lines} lines ({hard / lines:.1%}): no attempt of {args.n} correct")
        print(f"sampled     {lines - summary['resumed']} line(s) now, {summary['resumed']} done by an earlier run")
        print(f"wrote       {args.out}")
    return 0
