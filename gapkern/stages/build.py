"""The aligned training data (SPEC 4.1, 4.2) in one folder, everything ``gapkern train`` needs:

    DIR/samples.jsonl   the validated samples (image paths absolute, ``image`` given as ``images``), file order
    DIR/targets/        the latent targets: ``gapkern.data.targets`` shards + ``index.json``, keyed ``"{id}/{step}"``
    DIR/build.json      the settings: model, samples (the source file), g, K = g*g, profile, dim, line counts

Targets are computed for the lines that train with latents
(:func:`gapkern.data.uses_latents`: the hard lines of a curated file, every
line of one that was not curated). ``build.json`` is written last, so a
folder with it is complete; a rerun recomputes only the shards that are
missing (or were made with other settings).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

from .. import distributed
from .._io import atomic_write_json, atomic_write_text, read_json
from ..data import image_embeddings, latent_keys, load_samples, pool_targets, uses_latents
from ..data.targets import TargetReader, TargetWriter

__all__ = ["BUILD", "SAMPLES", "TARGETS", "build_data", "load_build", "Build"]

BUILD, SAMPLES, TARGETS = "build.json", "samples.jsonl", "targets"
FORMAT = "gapkern-build/1"


def _latent_inputs(sample: dict) -> list[tuple[str, tuple[str, list | None]]]:
    """(key, (image, box)) of each latent step of a sample, in step order."""
    steps = [s["latent"] for s in sample.get("steps") or [] if "latent" in s]
    return [(key, (step["image"], step.get("box"))) for key, step in zip(latent_keys(sample), steps)]


def build_data(model, samples: list[dict], out: str, *, g: int, profile: str, model_path: str,
               source: str | None = None, settings: dict | None = None, batch_images: int = 8,
               shard_size: int = 64, progress: bool | None = None) -> dict:
    """Compute the latent targets of ``samples`` (``load_samples``' output) into ``out`` and write the folder.

    Each target is the step's image (or ``box`` crop) through the vision
    tower, pooled to ``g x g`` on its merged grid (float32, ``(g*g, D)``).
    Under torchrun the ranks split the shards; every rank calls this with the
    same arguments. Returns build.json's content.
    """
    from tqdm import tqdm

    if isinstance(g, bool) or not isinstance(g, int) or g < 1:
        raise ValueError(f"g: expected a positive int (K = g*g latents per span), got {g!r}")
    rank, world = distributed.rank_world()
    dim = model.config.text_config.hidden_size
    latent = [s for s in samples if uses_latents(s) and latent_keys(s)]
    meta = {"model": model_path, "g": g, "dim": dim, "dtype": str(model.dtype).removeprefix("torch."),
            "image_settings": settings}  # what the target values depend on: a change recomputes every shard
    writer = TargetWriter(os.path.join(out, TARGETS), latent, meta=meta, shard_size=shard_size)
    unfinished = writer.pending()  # over every rank: each shard's header read once
    computed, pending = len(unfinished), [(i, chunk) for i, chunk in unfinished if i % world == rank]
    todo = sum(len(latent_keys(s)) for _, chunk in pending for s in chunk)
    with tqdm(total=todo, desc="targets", unit="step", disable=distributed.bar_disable(progress)) as bar:
        for index, chunk in pending:
            keys, images = zip(*[item for s in chunk for item in _latent_inputs(s)])
            targets = {}
            for key, (embeds, grid) in zip(keys, image_embeddings(model, list(images), settings=settings,
                                                                  batch_images=batch_images)):
                targets[key] = pool_targets(embeds.float(), grid, g)  # writer.write copies it to the CPU
                bar.update()
            writer.write(index, targets)
    distributed.barrier()
    summary = {"format": FORMAT, "model": model_path, "samples": source, "g": g, "K": g * g, "profile": profile,
               "dim": dim, "lines": len(samples), "latent_lines": len(latent),
               "latent_steps": sum(len(keys) for keys in writer.keys),
               "shards": len(writer.shards), "computed_shards": computed}
    if rank == 0:
        writer.finish()
        text = "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples)
        atomic_write_text(os.path.join(out, SAMPLES), text)
        build = {k: v for k, v in summary.items() if k not in ("shards", "computed_shards")}
        atomic_write_json(os.path.join(out, BUILD), build)
    distributed.barrier()
    return summary


@dataclass
class Build:
    """A built folder: ``settings`` (build.json), ``samples`` (validated), ``targets`` (a TargetReader)."""

    settings: dict
    samples: list[dict]
    targets: TargetReader


def load_build(folder: str) -> Build:
    """Read a folder written by :func:`build_data` (``gapkern build-data``)."""
    path = os.path.join(folder, BUILD)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"folder: no {BUILD} in {folder!r}; run gapkern build-data to the end first")
    settings = read_json(path)
    if settings.get("format") != FORMAT:
        raise ValueError(f"folder: {path!r} is not a {FORMAT} file (format {settings.get('format')!r})")
    return Build(settings, load_samples(os.path.join(folder, SAMPLES)), TargetReader(os.path.join(folder, TARGETS)))
