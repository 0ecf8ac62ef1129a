"""fit-pca and build-data load only the vision tower and merger (issue 18, item 6): the same visual input
embeddings as the whole model gives, from either weight layout, in the dtype asked for."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from gapkern.commands import UsageError
from gapkern.commands._common import Place, load_vision
from gapkern.data import image_embeddings
from gapkern.models.qwen2_5_vl.vision_only import load_vision_tower
from gapkern.testing import tiny_qwen2_5_vl

from stages import SIZES, images


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = images(tmp_path_factory.mktemp("vision"))
    model, _ = tiny_qwen2_5_vl(vision_depth=2)
    model.save_pretrained(root / "hub")  # visual.*, model.language_model.* -> model.*
    model.save_pretrained(root / "inner", save_original_format=False)  # model.visual.*, as Trainer checkpoints
    return root, model


@pytest.mark.parametrize("layout", ["hub", "inner"])
def test_tower_alone_gives_the_whole_models_embeddings(folders, layout):
    root, model = folders
    pictures = [(str(root / "img" / f"{i}.png"), None) for i in range(len(SIZES))] + [
        (str(root / "img" / "0.png"), [0, 0, 112, 84])]
    tower = load_vision_tower(str(root / layout), torch.float32)
    assert sum(p.numel() for p in tower.parameters()) == sum(p.numel() for p in model.model.visual.parameters())
    want = list(image_embeddings(model, pictures, batch_images=2))
    got = list(image_embeddings(tower, pictures, batch_images=2))
    for (a, grid_a), (b, grid_b) in zip(want, got, strict=True):
        assert grid_a == grid_b and torch.equal(a, b)


def test_tower_loads_in_the_dtype_asked_for(folders):
    root, _ = folders
    tower = load_vision_tower(str(root / "hub"), torch.bfloat16)
    assert {p.dtype for p in tower.parameters()} == {torch.bfloat16} and tower.dtype == torch.bfloat16


def test_weights_without_a_tower_are_a_one_line_error(folders, tmp_path):
    root, _ = folders
    (tmp_path / "config.json").write_bytes((root / "hub" / "config.json").read_bytes())
    tensors = load_file(root / "hub" / "model.safetensors")
    save_file({k: v for k, v in tensors.items() if not k.startswith("visual.")}, tmp_path / "model.safetensors")
    with pytest.raises(UsageError, match=r"--model: .* no vision tower tensors \(visual\.\* or model\.visual\.\*\)"):
        load_vision(str(tmp_path), Place(0, 1, torch.device("cpu"), torch.float32))
