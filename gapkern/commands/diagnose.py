"""Measure the norm gap (SPEC 4.7): hidden states and latents against the input embeddings' norm.

Over the prompts of a sample file (the first --limit lines): the mean L2
norm of the text input embeddings and of the visual ones (the merger outputs
at image tokens), of every layer's hidden states at text and at visual
positions (before the final norm, and after it for the last layer), and of
the latents a generate writes, before calibration and as fed back, for each
--calibration mode. A model that opens no latent span by itself on the first
batch is made to open one right after the prompt (--span-at changes that).
Ratios: hidden over the matching input norm, latents over the visual input
norm. Writes OUT/diagnosis.json and OUT/diagnosis.png (ratio per layer, log
scale, the latents marked) and prints a short table.
"""
from __future__ import annotations

import os

from . import UsageError
from ._common import (add_model_arguments, check_out_folder, check_span_at, checkpoint_config, hidden_size,
                      positive_int, read_samples, start)
from ._gap import CALIBRATIONS, add_gap_arguments, calibrations, load_head

NAME = "diagnose"
HELP = "measure the norm gap: per-layer hidden-state and latent norms against the input embeddings'"


def add_arguments(parser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--samples", required=True, metavar="FILE", help="the sample file (JSONL, SPEC 4.1)")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for diagnosis.json and diagnosis.png")
    add_gap_arguments(parser, calibration_help=f"modes the latents are generated with, comma-separated, of "
                                               f"{', '.join(CALIBRATIONS)} (default: all three)")
    parser.add_argument("--limit", type=int, metavar="N", help="only the first N lines (default: all)")
    parser.add_argument("--span-at", type=int, metavar="I",
                        help="make every response open a latent span at new position I; -1: never "
                             "(default: at 0 when the model opens none by itself on the first batch)")
    parser.add_argument("--batch", type=int, default=8, metavar="LINES",
                        help="lines per forward / generate (default 8)")
    parser.add_argument("--max-new-tokens", type=int, default=128, metavar="N",
                        help="new positions per response, latent ones included (default 128)")


def _check(args) -> None:
    for option in ("batch", "max_new_tokens", "latent_budget", "limit"):
        if getattr(args, option) is not None:
            positive_int(getattr(args, option), "--" + option.replace("_", "-"))
    check_span_at(args.span_at, args.max_new_tokens)
    check_out_folder(args.out)


def run(args) -> int:
    from ..stages.diagnose import diagnose, diagnosis_table, write_diagnosis
    from ..data.images import image_settings
    from ._common import load_model, load_tokenizer
    from ._gap import prepare

    _check(args)
    head = load_head(args.head, {args.model: hidden_size(checkpoint_config(args.model))})
    modes = calibrations(args.calibration) or list(CALIBRATIONS)
    samples = read_samples(args.samples)[:args.limit]
    if not any(s["images"] for s in samples):
        raise UsageError(f"--samples: no line of {args.samples!r} (first {len(samples)}) has an image; the gap is "
                         "measured against visual input embeddings")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UsageError("diagnose runs as one process; run it without torchrun")
    place = start(args)
    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model, place)
    suppress = prepare(model, tokenizer, head, latent_budget=args.latent_budget, profile=args.profile,
                       path=args.model)
    span_at = "auto" if args.span_at is None else None if args.span_at == -1 else args.span_at
    found = diagnose(model, tokenizer, samples, calibrations=modes, batch=args.batch,
                     max_new_tokens=args.max_new_tokens, span_at=span_at, suppress=suppress,
                     settings=image_settings(args.model))
    found = {"model": os.path.abspath(args.model), "samples": os.path.abspath(args.samples),
             "head": "none" if model.gap.head is None else f"PCA rank {model.gap.head.rank}",
             "latent_budget": model.gap.config.latent_budget, **found}
    paths = write_diagnosis(found, args.out, title=f"Norm gap: {os.path.basename(os.path.abspath(args.model))}")
    print(diagnosis_table(found), end="")
    print(f"wrote       {', '.join(paths)}")
    return 0
