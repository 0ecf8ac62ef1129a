"""The visual input embeddings (the merger outputs) of images, in one place.

- ``visual_embeddings``: one ``(h*w, D)`` tensor per image, row-major on its
  merged grid, for pixel inputs already built.
- ``image_embeddings``: the same for image files (or crops), batched.
- ``merged_grid``: (h, w) of an image's merged patch grid.
- ``sample_images``: every distinct image input of a sample file.
"""
from __future__ import annotations

import torch

from .images import image_inputs

__all__ = ["merged_grid", "visual_embeddings", "image_embeddings", "sample_images"]


def merged_grid(image_grid_thw: torch.Tensor, vision_config) -> tuple[int, int]:
    """(h, w) of one image's merged patch grid: the layout of its visual input embeddings."""
    _, gh, gw = (int(v) for v in image_grid_thw.reshape(-1, 3)[0])
    merge = vision_config.spatial_merge_size
    return gh // merge, gw // merge


def visual_embeddings(model, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> list[torch.Tensor]:
    """The visual input embeddings of each image: one ``(h*w, D)`` tensor per image, row-major on its merged grid.

    They are the merger outputs the language model consumes at the image's
    token positions (``model.model.get_image_features(...).pooler_output``),
    for a Qwen2.5-VL ``...ForConditionalGeneration``. Inputs move to the
    vision tower's device and dtype; no gradient is kept.
    """
    from ..models.qwen2_5_vl.hf_compat import merger_outputs, vision_tower

    param = next(vision_tower(model).parameters())
    with torch.no_grad():
        return list(merger_outputs(model, pixel_values.to(param.device, param.dtype), image_grid_thw.to(param.device)))


def image_embeddings(model, images, *, settings: dict | None = None, batch_images: int = 8):
    """Yields ``(embeds (h*w, D), (h, w))`` for each ``(path, box)`` of ``images``, in order.

    ``batch_images`` images go through the vision tower at once (it keeps
    images apart: one call for several equals one call each, up to rounding).
    """
    if isinstance(batch_images, bool) or not isinstance(batch_images, int) or batch_images < 1:
        raise ValueError(f"batch_images: expected a positive int, got {batch_images!r}")
    vision = model.config.vision_config
    for start in range(0, len(images), batch_images):
        inputs = [image_inputs(path, vision, box=box, settings=settings)
                  for path, box in images[start:start + batch_images]]
        grids = torch.cat([i["image_grid_thw"] for i in inputs])
        embeds = visual_embeddings(model, torch.cat([i["pixel_values"] for i in inputs]), grids)
        for one, grid in zip(embeds, grids):
            yield one, merged_grid(grid, vision)


def sample_images(samples: list[dict], *, latent: bool = False) -> list[tuple[str, list | None]]:
    """Every distinct image input of ``samples`` as ``(path, box)``, in first-seen order.

    The images of each line (``box`` None); with ``latent`` also each latent
    step's image or crop (a crop is its own input: the model sees it at its
    own resolution).
    """
    seen = {}
    for sample in samples:
        items = [(path, None) for path in sample.get("images", [])]
        if latent:
            items += [(s["latent"]["image"], s["latent"].get("box")) for s in sample.get("steps") or []
                      if "latent" in s]
        for path, box in items:
            seen.setdefault((path, None if box is None else tuple(box)), (path, box))
    return list(seen.values())
