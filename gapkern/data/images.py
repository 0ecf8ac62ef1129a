"""A chat prompt with one image, as Qwen2.5-VL's processor builds it, from a tokenizer alone.

The full Qwen2.5-VL processor of transformers also loads a video processor,
which needs torchvision; this module rebuilds the image part with torch:
``smart_resize``'d pixels (Pillow, bicubic), rescaled and normalised, cut into
the flat patch layout (``pixel_values (patches, 3 * T * P * P)``,
``image_grid_thw (1, 3)``), and the chat template's one image token expanded
to one token per merged patch. tests/models/test_transformers_contract.py pins the
pixels to transformers' ``Qwen2VLImageProcessorPil`` (equal on every release
CI tests), from the same ``preprocessor_config.json``.
"""
from __future__ import annotations

import json
import math
import os

import torch

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # the Qwen2-VL image processor's defaults
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MIN_PIXELS, MAX_PIXELS = 56 * 56, 28 * 28 * 1280


def image_settings(folder: str | None) -> dict:
    """mean, std, min / max pixels: from the checkpoint's ``preprocessor_config.json`` if it has one."""
    out = {"mean": CLIP_MEAN, "std": CLIP_STD, "min_pixels": MIN_PIXELS, "max_pixels": MAX_PIXELS}
    path = None if folder is None else os.path.join(folder, "preprocessor_config.json")
    if path is None or not os.path.isfile(path):
        return out
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, dict) or not isinstance(data.get("size") or {}, dict):
        raise ValueError(f"{path}: expected a JSON object with an object 'size', got {data!r:.80}")
    size = data.get("size") or {}
    for name in ("image_mean", "image_std"):
        if not isinstance(data.get(name, []), (list, tuple)):
            raise ValueError(f"{path}:{name}: expected a list of 3 numbers, got {data[name]!r}")
    out["mean"] = tuple(data.get("image_mean", out["mean"]))
    out["std"] = tuple(data.get("image_std", out["std"]))
    out["min_pixels"] = data.get("min_pixels", size.get("shortest_edge", out["min_pixels"]))
    out["max_pixels"] = data.get("max_pixels", size.get("longest_edge", out["max_pixels"]))
    _check_settings(path, out)
    return out


def _check_settings(path: str, out: dict) -> None:
    """The image settings read from ``path``, each of the type the resize and normalisation need."""
    for name in ("mean", "std"):
        values = out[name]
        if (len(values) != 3 or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                        and math.isfinite(v) for v in values)
                or (name == "std" and min(values) <= 0)):
            raise ValueError(f"{path}:image_{name}: expected 3 finite numbers{' > 0' if name == 'std' else ''}, "
                             f"got {list(values)!r}")
    for name in ("min_pixels", "max_pixels"):
        if isinstance(out[name], bool) or not isinstance(out[name], int) or out[name] < 1:
            raise ValueError(f"{path}:{name}: expected a positive int, got {out[name]!r}")
    if out["min_pixels"] > out["max_pixels"]:
        raise ValueError(f"{path}:min_pixels: {out['min_pixels']} is above max_pixels {out['max_pixels']}")


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """The size Qwen2-VL's processor resizes to: multiples of ``factor``, pixels within bounds, aspect kept."""
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return max(h, factor), max(w, factor)


def synthetic_image(size: int = 224, seed: int = 0) -> torch.Tensor:
    """A smooth random colour field (3, size, size) in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, 4, 4, generator=g)
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=True)[0]


def read_image(path: str, factor: int, min_pixels: int, max_pixels: int) -> torch.Tensor:
    """An image file as (3, H, W) in [0, 1], resized as the processor would."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as img:
        img = img.convert("RGB")
        h, w = smart_resize(img.height, img.width, factor, min_pixels, max_pixels)
        img = img.resize((w, h), Image.Resampling.BICUBIC)
        return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 255


def pixel_inputs(image: torch.Tensor, vision_config, mean=CLIP_MEAN, std=CLIP_STD) -> dict:
    """``image`` (3, H, W) in [0, 1], H and W multiples of patch * merge -> pixel_values, image_grid_thw."""
    patch, merge = vision_config.patch_size, vision_config.spatial_merge_size
    temporal = vision_config.temporal_patch_size
    c, h, w = image.shape
    if h % (patch * merge) or w % (patch * merge):
        raise ValueError(f"image: height and width must be multiples of {patch * merge}, got {h}x{w}")
    x = (image.float() - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    gh, gw = h // patch, w // patch
    x = x.reshape(c, gh // merge, merge, patch, gw // merge, merge, patch).permute(1, 4, 2, 5, 0, 3, 6)
    x = x.unsqueeze(5).expand(-1, -1, -1, -1, -1, temporal, -1, -1)  # a still image fills every temporal slot
    return {"pixel_values": x.reshape(gh * gw, c * temporal * patch * patch),
            "image_grid_thw": torch.tensor([[1, gh, gw]])}


def image_inputs(path: str, vision_config, *, box=None, settings: dict | None = None) -> dict:
    """An image file, or its pixel crop ``box = [x0, y0, x1, y1]``, as ``pixel_values`` / ``image_grid_thw``.

    Resized as Qwen2.5-VL's processor does (``smart_resize`` to multiples of
    patch x merge within ``settings``' min / max pixels; ``settings`` from
    :func:`image_settings`, defaults without). Needs Pillow.
    """
    settings = settings or image_settings(None)
    factor = vision_config.patch_size * vision_config.spatial_merge_size
    bounds = settings["min_pixels"], settings["max_pixels"]
    if box is None:
        image = read_image(path, factor, *bounds)
    else:
        image = _read_crop(path, box, factor, *bounds)
    return pixel_inputs(image, vision_config, settings["mean"], settings["std"])


def _read_crop(path, box, factor, min_pixels, max_pixels) -> torch.Tensor:
    import numpy as np
    from PIL import Image

    with Image.open(path) as img:
        x0, y0, x1, y1 = (round(v) for v in box)
        if not (0 <= x0 < x1 <= img.width and 0 <= y0 < y1 <= img.height):
            raise ValueError(f"box: {list(box)!r} is not a crop of the {img.width}x{img.height} image {path!r}")
        crop = img.convert("RGB").crop((x0, y0, x1, y1))
    h, w = smart_resize(crop.height, crop.width, factor, min_pixels, max_pixels)
    crop = crop.resize((w, h), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(crop).copy()).permute(2, 0, 1).float() / 255
