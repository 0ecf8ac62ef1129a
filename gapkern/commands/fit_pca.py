"""Fit the PCA latent head on the visual input embeddings of a sample file's images (SPEC 4.3).

Every image of every line (each once; with --latent-images also each latent
step's image or crop) goes through the model's vision tower; every merged
token is one row of the float64 statistics. Writes DIR/head.safetensors (the
PCALatentHead), DIR/pca.json (d, eigenvalues, cumulative explained variance)
and DIR/pca.png (that curve, d marked). Under torchrun the ranks split the
images and all-reduce the statistics: N ranks give the head one rank gives.
"""
from __future__ import annotations

import os

from . import UsageError
from ._common import (add_model_arguments, checkpoint_config, fraction, hidden_size, load_vision, positive_int,
                      read_samples, start)

NAME = "fit-pca"
HELP = "fit the PCA latent head on the visual input embeddings of a sample file's images"


def add_arguments(parser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--samples", required=True, metavar="FILE", help="the sample file (JSONL, SPEC 4.1)")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for head.safetensors, pca.json, pca.png")
    pick = parser.add_mutually_exclusive_group()
    pick.add_argument("--variance", type=float, default=0.95, metavar="F",
                      help="keep the smallest rank d whose explained variance reaches F (default 0.95)")
    pick.add_argument("--rank", type=int, metavar="D", help="keep exactly D components")
    parser.add_argument("--no-whiten", action="store_true",
                        help="coefficients in the basis' units (default: divided by sqrt(eigenvalue))")
    parser.add_argument("--latent-images", action="store_true",
                        help="also fit on the latent steps' images and crops (each distinct one once)")
    parser.add_argument("--batch-images", type=int, default=8, metavar="N",
                        help="images per vision-tower call (default 8)")


def run(args) -> int:
    from .. import distributed
    from ..data import sample_images
    from ..data.images import image_settings
    from ..stages.pca import fit_images

    fraction(args.variance, "--variance")
    if args.rank is not None:
        positive_int(args.rank, "--rank")
    positive_int(args.batch_images, "--batch-images")
    dim = hidden_size(checkpoint_config(args.model))
    if args.rank is not None and args.rank > dim:
        raise UsageError(f"--rank: expected at most the embedding width D={dim}, got {args.rank}")
    images = sample_images(read_samples(args.samples), latent=args.latent_images)
    if not images:
        raise UsageError(f"--samples: {args.samples!r} names no image to fit on")
    place = start(args)
    try:
        model = load_vision(args.model, place)
        stats = fit_images(model, images, settings=image_settings(args.model), batch_images=args.batch_images)
        if place.rank == 0:
            try:
                head = stats.fit(args.variance, rank=args.rank, whiten=not args.no_whiten)
            except ValueError as exc:
                raise UsageError(f"--rank: {exc}" if args.rank else f"--samples: {exc}") from None
            _write(args, stats, head, len(images), place.world)
    finally:
        distributed.close()
    return 0


def _write(args, stats, head, n_images, world) -> None:
    """Rank 0: the three files, then the summary."""
    from ..stages.pca import write_fit_summary

    paths = [os.path.join(args.out, name) for name in ("head.safetensors", "pca.json", "pca.png")]
    head.save(paths[0])
    summary = write_fit_summary(stats, head.rank, paths[1], paths[2],
                                variance=None if args.rank is not None else args.variance)
    ranks = f" on {world} ranks" if world > 1 else ""
    print(f"images      {n_images}{ranks}: {stats.count} visual embeddings of width D={stats.dim}")
    print(f"head        d={head.rank} keeps {summary['explained_at_d']:.1%} of the variance"
          f"{'' if args.rank is not None else f' (asked {args.variance:g})'}, "
          f"{'not whitened' if args.no_whiten else 'whitened'}")
    print(f"wrote       {', '.join(paths)}")
