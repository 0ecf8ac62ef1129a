"""A checkpoint's vision tower and merger alone: what fit-pca and build-data run, without the language model.

Qwen2.5-VL-7B's tower with its merger is ~0.67e9 parameters of ~8.3e9; the
stages that only need visual input embeddings (SPEC 4.2, 4.3) load just
those tensors from the safetensors files (sharded or not, hub layout
``visual.*`` or transformers' inner layout ``model.visual.*``), so a 7B
checkpoint costs the tower's memory, in the dtype asked for.

``VisionTower`` answers what :func:`gapkern.data.image_embeddings` reads of a
full model: ``config`` (the whole Qwen2.5-VL config), ``model.visual``,
``model.get_image_features(...)`` and ``dtype``.
"""
from __future__ import annotations

import json
import os

import torch

from . import hf_compat as hf

__all__ = ["VisionTower", "load_vision_tower"]

PREFIXES = ("visual.", "model.visual.")


class _Inner(torch.nn.Module):
    def __init__(self, visual):
        super().__init__()
        self.visual = visual

    def get_image_features(self, pixel_values, image_grid_thw):
        return hf.tower_image_features(self, pixel_values, image_grid_thw)


class VisionTower(torch.nn.Module):
    def __init__(self, config, visual):
        super().__init__()
        self.config = config
        self.model = _Inner(visual)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device


def _weight_files(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
    else:
        names = ["model.safetensors"]
    files = [os.path.join(path, name) for name in names]
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise FileNotFoundError(f"no weights file {missing[0]!r} in {path!r}")
    return files


def _vision_tensors(path: str) -> dict[str, torch.Tensor]:
    """The tower's tensors, keyed as the tower names them (prefix removed)."""
    from safetensors import safe_open

    out = {}
    for file in _weight_files(path):
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                prefix = next((p for p in PREFIXES if key.startswith(p)), None)
                if prefix is not None:
                    out[key[len(prefix):]] = f.get_tensor(key)
    return out


def load_vision_tower(path: str, dtype=None, device=None) -> VisionTower:
    """The vision tower and merger of the Qwen2.5-VL checkpoint folder ``path``, in eval mode, in ``dtype``
    (default: the saved one) on ``device``. A tensor missing or left over is an error naming it."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    tensors = _vision_tensors(path)
    if not tensors:
        raise ValueError(f"{path!r}: no vision tower tensors (visual.* or model.visual.*) in its weights")
    dtype = dtype or next(iter(tensors.values())).dtype
    default = torch.get_default_dtype()
    try:
        torch.set_default_dtype(dtype)  # built in dtype: no float32 copy of the tower
        visual = hf.new_vision_tower(config.vision_config)
    finally:
        torch.set_default_dtype(default)
    own = visual.state_dict()
    mismatched = sorted((k, list(v.shape), list(own[k].shape)) for k, v in tensors.items()
                        if k in own and v.shape != own[k].shape)
    if mismatched:
        key, saved, wanted = mismatched[0]
        raise ValueError(f"{os.path.join(path, 'config.json')!r} disagrees with the weights in {path!r}: "
                         f"{len(mismatched)} tensor(s) of other shapes (first: visual.{key} is {saved} in the "
                         f"weights, {wanted} by the config); fix config.json or use the checkpoint it was saved with")
    result = visual.load_state_dict({k: v.to(dtype) for k, v in tensors.items()}, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"{path!r}: the vision tower's weights do not match its config (missing "
                         f"{result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]})")
    return VisionTower(config, visual.to(device or "cpu")).eval()
