"""Build the aligned training data of a sample file (SPEC 4.1, 4.2): the folder ``gapkern train`` reads.

Validates the sample file (a bad line: file:line:field, nothing written),
then computes each latent step's target (its image, or the box crop of it,
through the vision tower, adaptive-average-pooled to g x g on the merged
grid: K = g*g vectors of width D) for the lines that train with latents
(the hard ones of a curated file; every line of one that was not curated).
Writes DIR/targets/ (safetensors shards + index.json), DIR/samples.jsonl
(the validated lines, image paths absolute) and, last, DIR/build.json (g, K,
profile, D, model). A rerun computes only the missing shards. Under torchrun
the ranks split the shards.
"""
from __future__ import annotations

import math
import os

from ..config import PROFILES
from ._common import (add_model_arguments, checkpoint_config, gap_settings, load_vision, positive_int, read_samples,
                      start)

NAME = "build-data"
HELP = "validate a sample file and compute its latent targets: the folder gapkern train reads"


def add_arguments(parser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--samples", required=True, metavar="FILE",
                        help="the sample file (JSONL, SPEC 4.1), curated or not")
    parser.add_argument("--out", required=True, metavar="DIR", help="the data folder to write (or complete)")
    parser.add_argument("--grid", type=int, metavar="G",
                        help="pool each target to G x G, K = G*G latents per span (default: the square root of "
                             "the checkpoint's latent budget if it is a square, else 4)")
    parser.add_argument("--profile", choices=tuple(PROFILES),
                        help="latent token profile the training text uses (default: the checkpoint's, else gap)")
    parser.add_argument("--batch-images", type=int, default=8, metavar="N",
                        help="images per vision-tower call (default 8)")
    parser.add_argument("--shard-size", type=int, default=64, metavar="N",
                        help="lines per target shard, the unit a rerun skips (default 64)")


def default_grid(budget) -> int:
    """g for K = g*g: the square root of the latent budget when it is a perfect square, else 4."""
    root = math.isqrt(budget) if isinstance(budget, int) and budget > 0 else 0
    return root if root * root == budget else 4


def run(args) -> int:
    from .. import distributed
    from ..stages.build import build_data
    from ..data.images import image_settings

    for option in ("grid", "batch_images", "shard_size"):
        if getattr(args, option) is not None:
            positive_int(getattr(args, option), "--" + option.replace("_", "-"))
    gap = gap_settings(checkpoint_config(args.model))
    g = args.grid or default_grid(gap.get("latent_budget", 16))
    profile = args.profile or gap.get("profile", "gap")
    samples = read_samples(args.samples)
    place = start(args)
    try:
        model = load_vision(args.model, place)
        summary = build_data(model, samples, args.out, g=g, profile=profile, model_path=os.path.abspath(args.model),
                             source=os.path.abspath(args.samples), settings=image_settings(args.model),
                             batch_images=args.batch_images, shard_size=args.shard_size)
    finally:
        distributed.close()
    if place.rank == 0:
        done = summary["shards"] - summary["computed_shards"]
        print(f"lines       {summary['lines']}, {summary['latent_lines']} train with latents "
              f"({summary['latent_steps']} latent steps)")
        print(f"targets     K={g * g} ({g}x{g}) x D={summary['dim']} float32 per latent step, profile {profile}")
        print(f"shards      {summary['computed_shards']} computed now, {done} done by an earlier run")
        print(f"wrote       {args.out}: samples.jsonl, targets/, build.json")
    return 0
